"""The distillation objective: config weights + layer maps -> one scalar and a dict of named terms.

A term is one entry of the registry :data:`distill.objective.terms.TERMS`: the feature it compares (logits, hidden states,
attentions, value vectors), the loss function from :mod:`distill.objective.losses`, which layer
pairs it uses and which heads it needs. :class:`Objective` reads the entries for the
terms a config weights above zero and derives from them

- what each model must produce (:meth:`Objective.requests`, :meth:`Objective.extract_kwargs`),
  so a term with weight 0 costs nothing: its tensors are never asked for;
- where prediction heads must run (:meth:`Objective.positions`);
- the learned width projections (parameters of this module: they train with the
  student and go into the training checkpoint, never into the saved student).

Layer maps are 1-based, ``0`` is the embedding output. By default student layer ``i``
is compared with teacher layer ``student_layers[i-1]``: the list the student was
initialised from, so the weight copy and the loss map cannot disagree.

What the training loop does with it::

    objective = Objective.from_config(weights, 2.0, student_config=student, teacher_config=teacher,
                                      student_layers=[1, 5, 8, 12])
    if objective.needs_attention:               # attention terms compare pre-dropout probabilities
        set_attention_dropout(student, 0.0)
    optimizer = AdamW([*student.parameters(), *objective.parameters()], ...)
    ...
    with torch.no_grad():                       # teacher in eval mode
        t = extract(teacher, ids, mask, **objective.extract_kwargs(batch, "teacher"))
    s = extract(student, ids, mask, **objective.extract_kwargs(batch, "student"))
    loss, terms = objective(s, t, batch)         # terms: {"ce": tensor, "mlm": tensor, ...}
"""

from __future__ import annotations

import dataclasses

import contextlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from distill.common.errors import UsageError
from distill.models.layers import (
    attention_index,
    hidden_index,
    parse_layer_map,
    parse_layers,
)
from distill.models.loading import (
    Features,
    family_of,
    hidden_size,
    num_heads,
    num_layers,
    role_from_architectures,
    role_of,
)
from distill.models.sentence import sentence_pooling
from distill.models.vocab_head import DeferredLogits, chunk_rows, chunked
from distill.objective.losses import check_relation_heads, check_temperature
from distill.objective.settings import ObjectiveSettings
from distill.objective.terms import (
    CORRUPTED_INPUT,
    MASKED,
    PER_HEAD,
    REAL,
    REPRESENTATION_WEIGHTS,
    SEQUENCE,
    SOFT,
    TERMS,
    TermContext,
    TermSpec,
    check_weights,
    format_weights,
)

__all__ = ["Objective", "Request", "TERMS", "TermSpec"]  # TERMS, TermSpec: the registry, re-exported

ROLES = ("student", "teacher")
_MEAN_POOLING = {"modes": ["mean"], "normalize": False}  # how sentence-transformers pools a plain transformers model


@dataclass(frozen=True)
class Request:
    """What one model must produce, in :func:`distill.models.loading.extract` terms.

    hidden / attentions / value_layers / qkv: as ``extract``'s arguments (layers 1-based).
    logits: where the prediction head must run: None (nowhere), ``"real"`` (every real
        token), ``"masked"`` (MLM targets only) or ``"sequence"`` (a task head's
        ``[B, classes]``, produced by the caller). :meth:`Objective.positions` turns the
        first three into the ``positions`` mask for ``extract``.
    attention_layers: the layers (1-based) whose attention maps a term reads: the only ones that need eager
        attention (:func:`distill.models.frozen.eager_only_on`).
    depth: the deepest layer any term reads, for ``extract(depth=...)``; None: the whole model (a head's
        output is read, or the role is the student, which trains every layer).
    """

    hidden: bool = False
    attentions: bool = False
    value_layers: tuple[int, ...] = ()
    qkv: tuple[tuple[int, str], ...] = ()
    logits: str | None = None
    attention_layers: tuple[int, ...] = ()
    depth: int | None = None


def _no_autocast(batch: Mapping):
    """Switch autocast off on the batch's devices: projections and losses run in full precision."""
    stack = contextlib.ExitStack()
    for device in sorted({v.device.type for v in batch.values() if isinstance(v, Tensor)}):
        stack.enter_context(torch.autocast(device_type=device, enabled=False))
    return stack


class Objective(nn.Module):
    """Weighted sum of registered loss terms; parameters are the learned width projections.

    Build it with :meth:`from_config`. Calling it returns ``(total, terms)``: the scalar
    to backpropagate and ``{config key: unweighted term value}`` (detached, float32)
    for logs, with ``total == sum(weights[k] * terms[k])``.

    Layered terms (hid_mse, att_mse, att_kl over the layer map) are the *mean* over their
    layer pairs, so a term's scale does not grow with the number of layers (TinyBERT sums).
    """

    def __init__(self, *, settings: ObjectiveSettings, weights: dict[str, float],
                 layer_pairs: dict[str, tuple[tuple[int, int], ...]], logits_at: dict[str, str | None],
                 projections: dict[str, tuple[int, int]], sequence_level: bool, record: dict):
        super().__init__()
        self.settings = settings
        self.weights = dict(weights)  # the active terms (calibration swaps them one at a time)
        self.layer_pairs = dict(layer_pairs)
        self.sequence_level = sequence_level
        self._logits_at = dict(logits_at)
        self._record = dict(record)
        # Vocabulary heads run chunk by chunk (distill.models.vocab_head) when every active logit term is a mean
        # over logit rows: logit_chunk_rows 0 = auto rows per chunk, N rows, -1 = never (the whole logits).
        logit_terms = [TERMS[n] for n in self.weights if TERMS[n].feature == "logits"]
        self._chunk_logits = (settings.logit_chunk_rows != -1 and not sequence_level and bool(logit_terms)
                              and all(spec.row_mean for spec in logit_terms))
        # The factor the loop multiplies the loss by before backward: chunked heads take their gradients at
        # it, in range. None: what Precision.autocast() says (the GradScaler's scale in fp16 modes), else 1.
        self.gradient_scale: float | None = None
        # One projection per term (TinyBERT shares W_h across hidden layers the same way):
        # student width -> teacher width, applied to the student's hidden states.
        self.projections = nn.ModuleDict({name: nn.Linear(w_in, w_out) for name, (w_in, w_out) in projections.items()})
        self._requests = {role: self._request_for(role) for role in ROLES}

    @property
    def temperature(self) -> float:
        return self.settings.temperature

    # -------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_config(cls, weights: Mapping[str, float] | None = None, temperature: float | None = None, *,
                    student_config, teacher_config, student_layers: Sequence[int] | str | None = None,
                    sequence_level: bool = False, settings: ObjectiveSettings | None = None,
                    **fields) -> "Objective":
        """Validate the settings against the two models and build the objective. Every bad value is a
        one-line :class:`UsageError`.

        Args:
            weights, temperature, **fields: the objective's settings (:class:`ObjectiveSettings`: weights,
                temperature, layer_map, relation_heads, relation_teacher_layer, restrict_ce_to_mask,
                projection, logit_chunk_rows), over ``settings`` or their declared defaults. A recipe
                passes ``settings=cfg`` (DistillConfig is an ObjectiveSettings).
            student_config, teacher_config: transformers configs, or the models themselves
                (pass the model when its config has no ``architectures`` yet, e.g. a student
                built in memory: the head is then read from the model class).
            student_layers: the 1-based teacher layers the student was initialised from
                (student layer i <-> teacher layer ``student_layers[i-1]``); the default
                layer map for hid_mse / att_mse / att_kl.
            sequence_level: task distillation: logits are ``[B, classes]`` from
                sequence-classification heads that the caller runs (``Features.logits``
                filled by the caller, positions None). Enables hard_ce; disables mlm/rtd terms.
        """
        settings = _settings(settings, weights, temperature, fields)
        active = check_weights(settings.weights)
        specs = {name: TERMS[name] for name in active}
        _check_levels(specs, sequence_level, settings.restrict_ce_to_mask)
        student_cfg, teacher_cfg = _config(student_config), _config(teacher_config)
        family_of(student_cfg), family_of(teacher_cfg)  # unsupported model types fail here, clearly
        if not sequence_level:  # at sequence level the caller runs its own task heads
            _check_heads(specs, student_config, teacher_config)
        _check_outputs(specs, student_cfg, teacher_cfg, sequence_level)

        n_student, n_teacher = num_layers(student_cfg), num_layers(teacher_cfg)
        if student_layers is not None:
            student_layers = parse_layers(student_layers, n_teacher, "teacher")
            if len(student_layers) != n_student:
                raise UsageError(
                    f"student_layers {','.join(map(str, student_layers))} name {len(student_layers)} teacher layers "
                    f"but the student has {n_student}: give one teacher layer per student layer"
                )
        pairs_map = _layer_map(settings.layer_map, student_layers, n_student, n_teacher, specs)
        relations = [n for n, spec in specs.items() if spec.layers == "relation"]
        if relations:
            settings.relation_teacher_layer = _check_relations(
                relations, settings.relation_heads, settings.relation_teacher_layer, student_cfg, teacher_cfg)
        record = {**{k: v for k, v in dataclasses.asdict(settings).items()
                     if relations or k not in ("relation_heads", "relation_teacher_layer")},
                  "weights": dict(active), "student_layers": list(student_layers) if student_layers is not None else None,
                  "layer_map": [list(p) for p in pairs_map] if pairs_map else None, "sequence_level": bool(sequence_level)}
        if any(spec.pooled for spec in specs.values()):  # pooled as the teacher's sentence-transformers pipeline
            record["sentence_pooling"] = sentence_pooling(getattr(teacher_cfg, "name_or_path", "")) or _MEAN_POOLING
        return cls(settings=settings, weights=active,
                   layer_pairs=_layer_pairs(specs, pairs_map, n_student, n_teacher, settings.relation_teacher_layer),
                   logits_at=_logits_at(specs, settings.restrict_ce_to_mask, sequence_level),
                   projections=_check_shapes(specs, student_cfg, teacher_cfg, settings.projection),
                   sequence_level=bool(sequence_level), record=record)

    def _request_for(self, role: str) -> Request:
        specs = [(name, TERMS[name]) for name in self.weights]
        if role == "teacher":
            specs = [(n, s) for n, s in specs if s.teacher]
        index = 0 if role == "student" else 1
        value_layers = sorted({pair[index] for n, s in specs if s.feature == "values" for pair in self.layer_pairs[n]})
        qkv = sorted({(pair[index], s.vectors) for n, s in specs if s.feature == "qkv" for pair in self.layer_pairs[n]})
        attention_layers = sorted({pair[index] for n, s in specs if s.feature == "attentions"
                                   for pair in self.layer_pairs[n]})
        read = [pair[index] for n, s in specs if n in self.layer_pairs for pair in self.layer_pairs[n]]
        # the teacher stops after the deepest layer a term reads, unless a head (at the top) is read
        # (at least one layer: the embedding output is recorded as the first layer's input)
        depth = max(1, *read) if role == "teacher" and read and self._logits_at[role] is None else None
        return Request(
            hidden=any(s.feature == "hidden" for _, s in specs),
            attentions=any(s.feature == "attentions" for _, s in specs),
            value_layers=tuple(value_layers),
            qkv=tuple(qkv),
            logits=self._logits_at[role],
            attention_layers=tuple(attention_layers),
            depth=depth,
        )

    # -------------------------------------------------------------------------------------
    # what the loop asks

    @property
    def needs_attention(self) -> bool:
        """True while an attention term is on: the loop must then call
        ``distill.models.loading.set_attention_dropout(student, 0.0)`` so the student's returned
        attention probabilities are the pre-dropout ones the terms compare."""
        return self._requests["student"].attentions

    @property
    def needs_teacher(self) -> bool:
        """False when no active term reads the teacher (e.g. ``{"mlm": 1}``): the loop may skip its forward."""
        return self._requests["teacher"] != Request()

    def requests(self) -> dict[str, Request]:
        """``{"student": Request, "teacher": Request}``: what each model must produce."""
        return dict(self._requests)

    def positions(self, batch: Mapping, role: str) -> Tensor | None:
        """Bool ``[B, S]``: where ``role``'s prediction head must run, for ``extract(positions=...)``.

        None when the role needs no token logits (or at sequence level). The gathered
        logits come back in ``positions.nonzero()`` order; labels are gathered the same way.
        """
        if role not in ROLES:
            raise ValueError(f"role {role!r}: expected 'student' or 'teacher'")
        where = self._logits_at[role]
        if where is None or where == SEQUENCE:
            return None
        real = _batch_value(batch, "attention_mask").bool()
        if where == REAL:
            return real
        return (_batch_value(batch, "mlm_labels") != -100) & real

    def targets(self, batch: Mapping, key: str) -> Tensor:
        """Labels ``batch[key]`` lined up with the student's logit rows: at sequence level the ``[B]``
        labels as they are, at token level the ``[B, S]`` labels gathered at
        ``positions(batch, "student")`` (in ``nonzero()`` order, as the logits are)."""
        value = _batch_value(batch, key)
        return value if self.sequence_level else value[self.positions(batch, "student")]

    def extract_kwargs(self, batch: Mapping, role: str) -> dict:
        """Keyword arguments for ``distill.models.loading.extract(model, input_ids, attention_mask, **kwargs)``."""
        request = self._requests[role]
        return {
            "hidden": request.hidden,
            "attentions": request.attentions,
            "value_layers": request.value_layers,
            "qkv": request.qkv,
            "positions": self.positions(batch, role),
            "defer_head": self._chunk_logits,
            "depth": request.depth,
        }

    def to_dict(self) -> dict:
        """The resolved settings (active weights, layer map, ...) as a JSON-able record for logs and model cards."""
        return dict(self._record)

    def describe(self, names: Sequence[str] | None = None) -> str:
        """E.g. ``"5*ce(T=2) + 2*mlm + 1*cos[s4=t12]"``: weights, temperature and layer pairs in one line (of the
        active terms ``names``, default all)."""
        parts = []
        for name, weight in self.weights.items():
            if names is not None and name not in names:
                continue
            part = f"{weight:g}*{name}"
            if TERMS[name].temperature:
                part += f"(T={self.temperature:g})"
            if name in self.layer_pairs:
                part += "[" + ",".join(f"s{s}=t{t}" for s, t in self.layer_pairs[name]) + "]"
            parts.append(part)
        return " + ".join(parts)

    def extra_repr(self) -> str:
        return self.describe()

    def self_copy_pairs(self, student_layers: Sequence[int] | None) -> dict[str, tuple[tuple[int, int], ...]]:
        """Layer-map pairs that compare a freshly copied student layer with its own source on the same input.

        A student built from teacher layers ``1, 2, ..., m, ...`` (a bottom run) reproduces the teacher exactly up
        to layer m, so a mapped term on a transformer-layer pair ``(i, i)`` with ``1 <= i <= m`` starts at zero
        (in eval mode; near zero under dropout): it only holds those layers where they are, it does not teach
        them. Terms on other pairs are not affected; the embedding pair ``(0, 0)`` is always a copy and is not
        reported (``emb_mse`` is meant as such a hold).
        """
        run = 0
        for i, t in enumerate(student_layers or (), start=1):
            if t != i:
                break
            run = i
        found = {}
        for name in self.weights:
            if TERMS[name].layers == "map":
                pairs = tuple((s, t) for s, t in self.layer_pairs[name] if 1 <= s <= run and s == t)
                if pairs:
                    found[name] = pairs
        return found

    # -------------------------------------------------------------------------------------
    # the loss

    def forward(self, student: Features, teacher: Features, batch: Mapping) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total, terms)`` for one batch.

        Args:
            student, teacher: :class:`distill.models.loading.Features` extracted with
                :meth:`extract_kwargs` (teacher under ``torch.no_grad()`` in eval mode).
            batch: ``input_ids``, ``attention_mask`` ``[B, S]``; ``mlm_labels`` ``[B, S]``
                (-100 = not a target) for mlm / masked positions; ``replaced_labels`` ``[B, S]``
                for rtd; ``labels`` ``[B]`` for hard_ce.

        Returns:
            total: float32 scalar, ``sum(weights[k] * terms[k])``, to backpropagate.
            terms: config key -> detached float32 scalar (unweighted), for logs.
        """
        return self.weighted(student, teacher, batch, list(self.weights))

    def weighted(self, student: Features, teacher: Features, batch: Mapping, names: list[str]
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`forward` over the active terms ``names`` only (several teachers: the soft-target terms on their
        mixture, the others on each teacher, :class:`distill.objective.mixture.TeacherMix`)."""
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        wanted = list(names)
        with _no_autocast(batch):
            chunked = [n for n in names if TERMS[n].feature == "logits"]
            # the logit terms together, chunk by chunk, when each is a mean over rows (else _logits materialises)
            if chunked and isinstance(student.logits, DeferredLogits) and all(TERMS[n].row_mean for n in chunked):
                total, parts = self._chunked_logit_terms(chunked, student, teacher, batch)
                terms.update(zip(chunked, parts.unbind()))
                names = [n for n in names if n not in terms]
            for name in names:
                weight = self.weights[name]
                value = self._term(name, student, teacher, batch)
                terms[name] = value.detach()
                total = weight * value if total is None else total + weight * value
        return total, {name: terms[name] for name in wanted}

    def _chunked_logit_terms(self, names: list[str], student: Features, teacher: Features, batch: Mapping):
        """``(weighted sum, unweighted values [len(names)])`` of the logit terms ``names`` over the student's
        deferred vocabulary head, chunk by chunk (:mod:`distill.models.vocab_head`)."""
        head = student.logits
        self._check_rows(head, "student", batch, names[0])
        n = head.shape[0]
        zt = None
        if any(TERMS[name].teacher for name in names):
            name = next(name for name in names if TERMS[name].teacher)
            zt = teacher.logits if teacher.logits is not None else self._logits(teacher, "teacher", batch, name)
            self._check_rows(zt, "teacher", batch, name)
        targets = _Targets(self, batch)
        # a term averaged over some rows only (mlm: the targets) counts each chunk by its share of them
        counted = {}
        for name in names:
            key = TERMS[name].row_mean
            if key != "rows":
                keep = targets.get(key) != -100
                counted[name] = (keep, keep.sum().clamp(min=1))
        weights = [self.weights[name] for name in names]
        with torch.no_grad():  # the teacher's decoder in its matmul dtype, once for all chunks
            zt_cast = zt.cast() if isinstance(zt, DeferredLogits) else None

        def teacher_rows(rows: slice):
            if zt is None:
                return None
            with torch.no_grad():
                return zt[rows] if zt_cast is None else zt.rows(rows, zt_cast)

        def share(name: str, rows: slice):
            """The chunk's weight in the term's mean: its share of the rows the term counts."""
            if name in counted:
                keep, count = counted[name]
                return keep[rows].sum() / count
            return (rows.stop - rows.start) / max(n, 1)

        def chunk_loss(rows: slice, zs: Tensor):
            zt_rows, ctx = teacher_rows(rows), self.context(batch, lambda key: targets.get(key)[rows])
            shares = [TERMS[name].loss(zs, zt_rows if TERMS[name].teacher else None, ctx) * share(name, rows)
                      for name in names]
            value = sum(w * v for w, v in zip(weights, shares))
            return value, torch.stack([v.detach() for v in shares])

        def chunk_grad(rows: slice, zs: Tensor, scale: float):
            """The chunk's value, parts and ``scale * d value / d zs``: each term's ``logit_grad``, adding its
            share into one gradient; autograd for a term without one."""
            zt_rows, ctx = teacher_rows(rows), self.context(batch, lambda key: targets.get(key)[rows])
            shares, grad, by_autograd = {}, None, []
            # the terms over every row first: the first writes the gradient, a term over some rows adds to it
            for name, weight in sorted(zip(names, weights), key=lambda nw: TERMS[nw[0]].row_mean != "rows"):
                spec, fraction = TERMS[name], share(name, rows)
                if spec.logit_grad is None:
                    by_autograd.append((name, weight, fraction))
                    continue
                value, grad = spec.logit_grad(zs, zt_rows if spec.teacher else None, ctx,
                                              fraction * (weight * scale), grad)
                shares[name] = value * fraction
            if by_autograd:
                with torch.enable_grad():
                    z = zs.detach().requires_grad_(True)
                    values = {name: TERMS[name].loss(z, zt_rows if TERMS[name].teacher else None, ctx)
                              * fraction for name, _, fraction in by_autograd}
                    attached = sum(weight * values[name] for name, weight, _ in by_autograd)
                    if attached.requires_grad:
                        (more,) = torch.autograd.grad(attached * scale, z)
                        grad = more if grad is None else grad.add_(more)  # in the logits' dtype, as the head casts
                shares.update((name, value.detach()) for name, value in values.items())
            value = sum(w * shares[name] for name, w in zip(names, weights))
            return value, torch.stack([shares[name] for name in names]), grad

        rows_per_chunk = chunk_rows(self.settings.logit_chunk_rows, n, head.shape[1], head.hidden.shape[-1])
        return chunked(chunk_loss, head, rows_per_chunk, self.gradient_scale, chunk_grad)

    def context(self, batch: Mapping, labels=None) -> TermContext:
        """The :class:`TermContext` every term of this objective is called with on ``batch``; ``labels``
        (key -> labels at the logit rows) defaults to :meth:`targets`."""
        return TermContext(batch=batch, mask=_batch_value(batch, "attention_mask").bool(),
                           temperature=self.settings.temperature, relation_heads=self.settings.relation_heads,
                           labels=labels or (lambda key: self.targets(batch, key)),
                           sentence_pooling=self._record.get("sentence_pooling"))

    def _term(self, name: str, student: Features, teacher: Features, batch: Mapping) -> Tensor:
        """One term's value: ``spec.loss(student, teacher, ctx)`` on the logits, or on each layer pair
        (mean over the pairs)."""
        spec, ctx = TERMS[name], self.context(batch)
        if spec.feature == "logits":
            zs = self._logits(student, "student", batch, name)
            zt = self._logits(teacher, "teacher", batch, name) if spec.teacher else None
            return spec.loss(zs, zt, ctx)
        values = [spec.loss(*self._pair(name, spec, student, teacher, s, t, ctx.mask), ctx)
                  for s, t in self.layer_pairs[name]]
        return values[0] if len(values) == 1 else torch.stack(values).mean()

    def _pair(self, name: str, spec: TermSpec, student: Features, teacher: Features, s: int, t: int,
              mask: Tensor) -> tuple[Tensor, Tensor]:
        """The two tensors a layered term compares at student layer ``s`` and teacher layer ``t``."""
        if spec.feature == "hidden":
            hs = _feature(student, "hidden_states", "student", name)[hidden_index(s)]
            ht = _feature(teacher, "hidden_states", "teacher", name)[hidden_index(t)]
            return self._project(name, hs, mask), ht
        if spec.feature == "attentions":
            return (_feature(student, "attentions", "student", name)[attention_index(s)],
                    _feature(teacher, "attentions", "teacher", name)[attention_index(t)])
        if spec.feature == "values":
            return _value(student, s, "student", name), _value(teacher, t, "teacher", name)
        if spec.feature == "qkv":
            return (_vectors(student, (s, spec.vectors), "student", name),
                    _vectors(teacher, (t, spec.vectors), "teacher", name))
        raise AssertionError(f"term {name!r}: unknown feature {spec.feature!r}")

    def _project(self, name: str, hidden: Tensor, mask: Tensor) -> Tensor:
        if name not in self.projections:
            return hidden
        proj = self.projections[name]
        # Zero the padding first: inf/NaN garbage there would make the weight gradient NaN.
        x = torch.where(mask[..., None], hidden, 0).float()
        return nn.functional.linear(x, proj.weight.float(), proj.bias.float())

    def _logits(self, features: Features, role: str, batch: Mapping, name: str) -> Tensor:
        logits = features.logits
        if logits is None:
            raise UsageError(
                f"term {name!r} needs the {role}'s logits but its Features have none: extract with "
                f"objective.extract_kwargs(batch, {role!r}) from a model with a prediction head"
            )
        self._check_rows(logits, role, batch, name)
        if isinstance(logits, DeferredLogits):  # a term taken alone (e.g. --calibrate): the whole head, once
            logits = features.logits = logits.materialize()
        return logits

    def _check_rows(self, logits, role: str, batch: Mapping, name: str) -> None:
        if self.sequence_level:
            rows = _batch_value(batch, "attention_mask").shape[0]
            what = "one row per example ([B, classes] from the task head)"
        else:
            rows = int(self.positions(batch, role).sum())
            what = f"one row per position in objective.positions(batch, {role!r})"
        if logits.shape[0] != rows:
            raise UsageError(f"term {name!r}: the {role}'s logits have {logits.shape[0]} rows, expected {rows}: {what}")


class _Targets:
    """``objective.targets(batch, key)`` gathered once per batch and key."""

    def __init__(self, objective: "Objective", batch: Mapping):
        self._objective, self._batch, self._cache = objective, batch, {}

    def get(self, key: str) -> Tensor:
        if key not in self._cache:
            self._cache[key] = self._objective.targets(self._batch, key)
        return self._cache[key]


# -----------------------------------------------------------------------------------------
# validation helpers (each raises one UsageError line naming the value and the fix)


def _batch_value(batch: Mapping, key: str) -> Tensor:
    if key not in batch:
        raise UsageError(f"the batch has no {key!r}: the active loss terms need it (batch keys: {', '.join(batch)})")
    return batch[key]


def _config(config_or_model):
    return config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model


def _head(config_or_model) -> tuple[str | None, str]:
    """(role or None if unknown, class name for messages) of a model or config."""
    if isinstance(config_or_model, nn.Module):
        try:
            return role_of(config_or_model), type(config_or_model).__name__
        except UsageError:  # a class outside the families' roles (e.g. a classifier): it has no head we know
            return "other", type(config_or_model).__name__
    architectures = getattr(config_or_model, "architectures", None)
    if not architectures:
        return None, getattr(config_or_model, "model_type", "model")
    return role_from_architectures(config_or_model), architectures[0]


_HEAD_NAMES = {"mlm": "a masked-LM head", "rtd": "an ELECTRA discriminator head"}


def _check_heads(specs: dict[str, TermSpec], student, teacher) -> None:
    if not any(s.student_heads or s.teacher_heads for s in specs.values()):
        return
    heads = {"student": _head(student), "teacher": _head(teacher)}
    for name, spec in specs.items():
        for who, allowed in (("student", spec.student_heads), ("teacher", spec.teacher_heads)):
            role, cls_name = heads[who]
            if allowed is None or role is None or role in allowed:
                continue
            need = " or ".join(_HEAD_NAMES[r] for r in sorted(allowed))
            if cls_name.endswith("ForSequenceClassification"):
                hint = "for task distillation between classification heads pass sequence_level=True"
            elif role == "rtd" and "mlm" in allowed:
                rtd_terms = " / ".join(f'"{k}"' for k, s in TERMS.items() if s.student_heads == {"rtd"})
                hint = f"an ELECTRA discriminator is distilled with {rtd_terms} (and representation terms)"
            elif "mlm" in allowed:
                hint = f"distil its representations instead, e.g. weights {format_weights(REPRESENTATION_WEIGHTS)}"
            else:
                hint = "load the ELECTRA discriminator (ElectraForPreTraining)"
            raise UsageError(f"term {name!r} needs {need} on the {who}, but the {who} ({cls_name}) has none: {hint}")
        if spec.same_head:
            (rs, cs), (rt, ct) = heads["student"], heads["teacher"]
            if rs is not None and rt is not None and rs != rt:
                raise UsageError(
                    f"term {name!r} compares logits of the same head: the student is a {cs}, the teacher a {ct}"
                )


def _check_outputs(specs: dict[str, TermSpec], student_cfg, teacher_cfg, sequence_level: bool) -> None:
    """Logit-comparing terms need the same output space: vocabulary, or task labels at sequence level."""
    compares = [n for n, s in specs.items() if s.feature == "logits" and s.teacher]
    if not compares:
        return
    field, fix = ("num_labels", "give both models the task's label count") if sequence_level else (
        "vocab_size", "give the student the teacher's tokenizer and vocabulary")
    vs, vt = getattr(student_cfg, field, None), getattr(teacher_cfg, field, None)
    if vs != vt:
        raise UsageError(
            f"term {compares[0]!r} compares the two models' outputs, but the student's {field} is {vs} "
            f"and the teacher's {vt}: {fix}"
        )


def _layer_map(layer_map, student_layers, n_student: int, n_teacher: int, specs) -> tuple[tuple[int, int], ...]:
    """The (student, teacher) pairs of the intermediate terms: explicit map, else from student_layers."""
    if layer_map is not None:
        return parse_layer_map(layer_map, n_student, n_teacher)
    if student_layers is not None:
        return tuple((i, t) for i, t in enumerate(student_layers, start=1))
    mapped = [n for n, s in specs.items() if s.layers == "map"]
    if mapped:
        raise UsageError(
            f"term {mapped[0]!r} compares intermediate layers but no layer map was given: pass student_layers "
            "(the teacher layers the student was built from, e.g. 1,5,8,12) or layer_map"
        )
    return ()


def _check_shapes(specs: dict[str, TermSpec], student_cfg, teacher_cfg, projection: bool) -> dict[str, tuple[int, int]]:
    """Width and head-count compatibility; returns the projections to create (term -> (in, out))."""
    ws, wt = hidden_size(student_cfg), hidden_size(teacher_cfg)
    hs, ht = num_heads(student_cfg), num_heads(teacher_cfg)
    projections = {}
    for name, spec in specs.items():
        if spec.feature == "hidden" and ws != wt:
            if not projection:
                raise UsageError(
                    f"term {name!r} compares hidden states but the student is {ws} wide and the teacher {wt}: "
                    "set projection: true to learn a linear map (trained with the student, not saved with it), "
                    "or drop the term"
                )
            projections[name] = (ws, wt)
        if spec.feature in PER_HEAD and hs != ht:
            raise UsageError(
                f"term {name!r} compares attention heads one to one, but the student has {hs} heads and the "
                f"teacher {ht}: give the student {ht} heads or drop the term"
            )
    return projections


def _settings(settings: ObjectiveSettings | None, weights, temperature, fields: dict) -> ObjectiveSettings:
    """A checked copy of ``settings`` (or the declared defaults) with ``weights``, ``temperature`` and
    ``fields`` put over it; a name that is no objective setting is one UsageError line."""
    names = {f.name for f in dataclasses.fields(ObjectiveSettings)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise UsageError(f"unknown objective setting(s) {', '.join(unknown)}: the settings are {', '.join(sorted(names))}")
    base = {f: getattr(settings, f) for f in names} if settings is not None else {}
    given = {**fields, **({"weights": weights} if weights is not None else {}),
             **({"temperature": temperature} if temperature is not None else {})}
    out = ObjectiveSettings(**{**base, **given}).check()
    out.temperature = check_temperature(out.temperature)
    if isinstance(out.logit_chunk_rows, bool) or not isinstance(out.logit_chunk_rows, int):
        raise UsageError(f"logit_chunk_rows={out.logit_chunk_rows!r} must be a whole number >= -1 "
                         "(0: auto, -1: never chunk the vocabulary head)")
    return out


def _check_levels(specs: dict[str, TermSpec], sequence_level: bool, restrict_ce_to_mask: bool) -> None:
    """Each term exists at the objective's level, and restrict_ce_to_mask only where there is masking."""
    level = "sequence" if sequence_level else "token"
    for name, spec in specs.items():
        if not (spec.sequence_level if sequence_level else spec.token_level):
            hint = ("use it for masked-LM / ELECTRA pre-training distillation (sequence_level=False)" if sequence_level
                    else "it is the task-label loss of sequence-classification distillation: pass sequence_level=True")
            raise UsageError(f"term {name!r} does not exist at {level} level: {hint}")
    if restrict_ce_to_mask and (sequence_level or any(s.input == CORRUPTED_INPUT for s in specs.values())):
        raise UsageError("restrict_ce_to_mask=True applies to masked-LM token distillation only: "
                         "set it to false for sequence-level or ELECTRA objectives")


def _layer_pairs(specs: dict[str, TermSpec], pairs_map, n_student: int, n_teacher: int,
                 relation_teacher_layer: int | None) -> dict[str, tuple[tuple[int, int], ...]]:
    """Each layered term's (student layer, teacher layer) pairs, 1-based (0 = the embedding output)."""
    layer_pairs: dict[str, tuple[tuple[int, int], ...]] = {}
    for name, spec in specs.items():
        if spec.layers == "relation":
            layer_pairs[name] = ((n_student, relation_teacher_layer),)
        elif spec.layers == "last":
            layer_pairs[name] = ((n_student, n_teacher),)
        elif spec.layers == "embeddings":
            layer_pairs[name] = ((0, 0),)
        elif spec.layers == "map":
            # Attention and value vectors exist for layers 1..L only; 0 (embeddings) is a hidden-state index.
            pairs = pairs_map if spec.feature == "hidden" else tuple((s, t) for s, t in pairs_map if s and t)
            if not pairs:
                raise UsageError(f"term {name!r}: the layer map has no pair of transformer layers (>= 1) to compare; "
                                 "layer 0 is the embedding output, which has no attention")
            layer_pairs[name] = pairs
    return layer_pairs


def _logits_at(specs: dict[str, TermSpec], restrict_ce_to_mask: bool, sequence_level: bool) -> dict[str, str | None]:
    """Where each role's head must run. Positions cover every active logit term's needs:
    masked targets are a subset of real tokens, so one gather serves ce and mlm together."""
    out: dict[str, str | None] = {}
    for role in ROLES:
        wanted = set()
        for spec in specs.values():
            if spec.feature != "logits" or (role == "teacher" and not spec.teacher):
                continue
            where = spec.logits_at
            if where == SOFT:
                where = MASKED if restrict_ce_to_mask else REAL
            wanted.add(SEQUENCE if sequence_level else where)
        out[role] = SEQUENCE if SEQUENCE in wanted else REAL if REAL in wanted else MASKED if MASKED in wanted else None
    return out


def _feature(features: Features, attr: str, role: str, name: str):
    value = getattr(features, attr)
    if value is None:
        raise UsageError(
            f"term {name!r} needs the {role}'s {attr} but its Features have none: "
            f"extract with objective.extract_kwargs(batch, {role!r})"
        )
    return value


def _vectors(features: Features, key: tuple[int, str], role: str, name: str) -> Tensor:
    if key not in features.qkv:
        raise UsageError(
            f"term {name!r} needs the {role}'s {key[1]} vectors of layer {key[0]}: "
            f"extract with objective.extract_kwargs(batch, {role!r})"
        )
    return features.qkv[key]


def _check_relations(names, relation_heads, relation_teacher_layer, student_cfg, teacher_cfg) -> int:
    """MiniLMv2's settings for the qkv terms: the teacher layer (1-based, default the last), and relation
    heads that divide both models' query/key/value widths. Returns the teacher layer."""
    n_teacher = num_layers(teacher_cfg)
    if relation_teacher_layer is None:
        relation_teacher_layer = n_teacher
    if isinstance(relation_teacher_layer, bool) or not isinstance(relation_teacher_layer, int) \
            or not 1 <= relation_teacher_layer <= n_teacher:
        raise UsageError(
            f"relation_teacher_layer {relation_teacher_layer!r} is out of range: the teacher has {n_teacher} layers "
            f"(1-based); {names[0]!r} compares the student's last layer with one of them (default: the last)"
        )
    try:
        check_relation_heads(relation_heads, student=hidden_size(student_cfg), teacher=hidden_size(teacher_cfg))
    except ValueError as err:
        raise UsageError(f"term {names[0]!r}: {err}") from None
    return relation_teacher_layer


def _value(features: Features, layer: int, role: str, name: str) -> Tensor:
    if layer not in features.values:
        raise UsageError(
            f"term {name!r} needs the {role}'s value vectors of layer {layer}: "
            f"extract with objective.extract_kwargs(batch, {role!r})"
        )
    return features.values[layer]
