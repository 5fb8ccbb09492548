"""The term registry: one entry per loss key, holding every fact about that term.

Everything else that names terms reads it: the objective (what each model must
produce, where heads run, layer pairs, projections), the batches (which terms need
masked or corrupted input), the ELECTRA checks, the model card and log lines (which
terms take the temperature), glue-eval (which terms exist at sequence level), the
help texts and the docs table (``python -m distill.objective.terms --markdown``). A new term is
one loss function in :mod:`distill.objective.losses` plus one :func:`register` call here; nothing
else changes.

Every term is called the same way: ``loss(student, teacher, ctx)``. ``student`` and
``teacher`` are the two tensors it compares (one layer pair's hidden states, attention maps,
value or query/key/value vectors, or the logit rows of its head; ``teacher`` is None for a
term against labels only), and ``ctx`` is a :class:`TermContext`: the attention mask, the
temperature, the relation heads, the labels lined up with the logit rows and the teacher's
sentence pooling. A term with
its own logit gradient takes ``logit_grad(student, teacher, ctx, scale, out)`` likewise.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, Mapping

from distill.common.errors import UsageError
from distill.objective import losses

# Where the student's prediction head must run for a logit term (TermSpec.logits_at):
SOFT = "soft"  # every real token, or only the MLM targets with restrict_ce_to_mask
REAL = "real"  # every real (non-padding) token
MASKED = "masked"  # only MLM prediction targets (mlm_labels != -100)
SEQUENCE = "sequence"  # one row per example from a task head, [B, classes]

# What the models read at token level (TermSpec.input); at sequence level both read the task's input.
PLAIN_INPUT = "plain"  # the text as it is
MASKED_INPUT = "masked"  # DistilBERT's masking (80/10/10 of 15% targets), the same for both models
CORRUPTED_INPUT = "corrupted"  # ELECTRA: a generator's samples put in place of the chosen tokens

FEATURES = ("logits", "hidden", "attentions", "values", "qkv")
PER_HEAD = ("attentions", "values")  # features compared attention head by attention head (equal head counts)
LAYERS = (None, "map", "last", "embeddings", "relation")
VECTORS = ("query", "key", "value")  # a qkv term's projection (TermSpec.vectors)
HEADS = frozenset({"mlm", "rtd"})  # model roles (distill.models.loading) that carry a prediction head

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class TermContext:
    """What a term may read besides the two tensors it compares: the same object for every term.

    batch: the batch (``input_ids``, ``attention_mask``, labels).
    mask: ``[B, S]`` bool, the real (non-padding) tokens.
    temperature: the soft-target temperature T.
    relation_heads: the relation heads of the MiniLMv2 terms.
    labels: ``key -> labels`` lined up with the student's logit rows of this call (at token level the
        ``[B, S]`` labels gathered at the head's positions, a chunk's rows in the chunked head; at
        sequence level the ``[B]`` labels).
    sentence_pooling: for the ``pooled`` terms, how the teacher's sentence-transformers pipeline pools:
        ``{"modes": ["mean"], "normalize": True}`` (None: mean pooling, not normalised, as
        sentence-transformers pools a plain model).
    """

    batch: Mapping
    mask: "Tensor"
    temperature: float
    relation_heads: int
    labels: Callable[[str], "Tensor"]
    sentence_pooling: Mapping | None = None

    def targets(self, key: str) -> "Tensor":
        """The labels ``batch[key]`` at this call's logit rows."""
        return self.labels(key)


@dataclass(frozen=True)
class TermSpec:
    """One registry entry: everything the toolkit needs to know about a loss term.

    key: the config key (``weights: {key: weight}``) and the name in logs.
    feature: what it compares: "logits", "hidden" (hidden states), "attentions"
        (probabilities), "values" (value vectors per head) or "qkv" (one layer's query,
        key or value projection output, all heads concatenated: ``vectors`` says which).
    loss: the function, ``loss(student, teacher, ctx) -> scalar`` (see the module docstring).
    doc: what it is, one line (docs table, help texts).
    formula / over: its value and what it is averaged over (docs table).
    teacher: whether it reads the teacher at all (False: against labels only).
    temperature: whether it takes the temperature T (and is multiplied by T^2).
    input: at token level, what the models read: PLAIN_INPUT, MASKED_INPUT or CORRUPTED_INPUT.
    token_level / sequence_level: whether it exists in pre-training (token) distillation
        and in task (sequence-classification) distillation.
    layers: for layered features, which pairs: "map" (the layer map), "last"
        (student last <-> teacher last), "embeddings" (0 <-> 0) or "relation" (student
        last <-> the objective's ``relation_teacher_layer``, MiniLMv2's choice).
    vectors: for ``feature="qkv"``, "query", "key" or "value".
    logits_at: for logit terms, where the student's head runs: SOFT, REAL, MASKED or SEQUENCE.
    student_heads / teacher_heads: heads (roles "mlm", "rtd") the model must carry at
        token level; None = any.
    same_head: both models' logits come from the same kind of head (compared entry by entry).
    softmax_outputs: compares distributions over several outputs, so a one-output
        (regression) task head cannot use it.
    projects: the student's hidden states go through a learned width projection when
        the widths differ.
    pooled: compares sentence embeddings, the last hidden states pooled (and normalised) as the
        teacher's sentence-transformers pipeline does (``TermContext.sentence_pooling``).
    source: where it comes from (paper or code base), for the docs.
    row_mean: for a token-level logit term whose value is a mean over logit rows: ``"rows"``
        (every row given counts) or the batch key of the labels whose ``-100`` rows do not count
        (``"mlm_labels"``). Such terms run over a vocabulary head chunk by chunk, never holding
        ``[N, vocab]`` logits (``logit_chunk_rows``); None: the term needs all its rows at once.
    logit_grad: for a ``row_mean`` term, optionally its value with its gradient w.r.t. the student's
        logits, without autograd: ``logit_grad(zs, zt, ctx, scale, out) -> (value, out +
        scale * d value / d zs)`` on one chunk's rows (``out`` None: 0). The chunked head then makes no
        autograd graph over the chunk's logits (fewer passes over its largest tensors); a row-mean term
        without one is differentiated by autograd, chunk by chunk, as before.
    """

    key: str
    feature: str
    loss: Callable
    doc: str
    formula: str = ""
    over: str = ""
    teacher: bool = True
    temperature: bool = False
    input: str = PLAIN_INPUT
    token_level: bool = True
    sequence_level: bool = True
    layers: str | None = None
    logits_at: str | None = None
    student_heads: frozenset | None = None
    teacher_heads: frozenset | None = None
    same_head: bool = False
    softmax_outputs: bool = False
    projects: bool = False
    vectors: str | None = None
    source: str = ""
    row_mean: str | None = None
    logit_grad: Callable | None = None
    pooled: bool = False

    def __post_init__(self):
        problems = []
        if not self.key.isidentifier():
            problems.append(f"key {self.key!r} must be an identifier (letters, digits, _)")
        if self.feature not in FEATURES:
            problems.append(f"feature {self.feature!r} must be one of {', '.join(FEATURES)}")
        if self.layers not in LAYERS:
            problems.append(f"layers {self.layers!r} must be one of map, last, embeddings or None")
        if (self.feature == "logits") != (self.layers is None):
            problems.append("a logit term has no layer pairs; every other feature needs layers")
        if (self.feature == "logits") != (self.logits_at is not None):
            problems.append("logits_at is set for logit terms and only for them")
        if self.logits_at not in (None, SOFT, REAL, MASKED, SEQUENCE):
            problems.append(f"logits_at {self.logits_at!r} must be soft, real, masked or sequence")
        if self.input not in (PLAIN_INPUT, MASKED_INPUT, CORRUPTED_INPUT):
            problems.append(f"input {self.input!r} must be plain, masked or corrupted")
        for heads in (self.student_heads, self.teacher_heads):
            if heads is not None and not heads <= HEADS:
                problems.append(f"heads {sorted(heads)} must be among {', '.join(sorted(HEADS))}")
        if not (self.token_level or self.sequence_level):
            problems.append("a term must exist at token level, sequence level or both")
        if (self.feature == "qkv") != (self.vectors is not None) or self.vectors not in (None, *VECTORS):
            problems.append(f"vectors {self.vectors!r}: a qkv term names one of {', '.join(VECTORS)}, and only it")
        if (self.layers == "relation") != (self.feature == "qkv"):
            problems.append("relation layers (student last <-> relation_teacher_layer) are for qkv terms, and only them")
        if self.row_mean is not None and (self.feature != "logits" or not self.token_level
                                          or not isinstance(self.row_mean, str)):
            problems.append(f"row_mean {self.row_mean!r}: only a token-level logit term is a mean over logit rows "
                            "('rows' or a batch key of labels)")
        if self.logit_grad is not None and (self.row_mean is None or not callable(self.logit_grad)):
            problems.append("logit_grad is a function, for a row_mean term only (its gradient over a chunk of rows)")
        if self.projects and self.feature != "hidden":
            problems.append("only hidden-state terms can go through a width projection")
        if self.pooled and (self.feature != "hidden" or self.layers != "last"):
            problems.append("a pooled (sentence-embedding) term compares the last hidden states: feature 'hidden', "
                            "layers 'last'")
        if not callable(self.loss):
            problems.append("loss must be a function")
        elif _third_parameter(self.loss) in ("mask", "attention_mask"):
            problems.append("its loss takes (student, teacher, mask), the form before terms took one context: "
                            "a term is called loss(student, teacher, ctx) (ctx.mask is the mask); wrap a mask "
                            "loss as terms.masked(fn)")
        if problems:
            raise ValueError(f"term {self.key!r}: " + "; ".join(problems))

    def reads(self, role: str) -> str | None:
        """The feature ``role`` ("student" or "teacher") must produce for this term, or None."""
        return self.feature if role == "student" or self.teacher else None

    @property
    def levels(self) -> str:
        """"token", "sequence" or "token, sequence": where the term exists."""
        return ", ".join(name for name, on in (("token", self.token_level), ("sequence", self.sequence_level)) if on)


def _third_parameter(fn) -> str | None:
    """The name of ``fn``'s third parameter (None where it has none or no signature can be read)."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params[2] if len(params) > 2 else None


TERMS: dict[str, TermSpec] = {}


def register(spec: TermSpec) -> TermSpec:
    """Add a term. Its key must be new: a registered term is never silently replaced."""
    if not isinstance(spec, TermSpec):
        raise TypeError(f"register() takes a TermSpec, got {type(spec).__name__}")
    if spec.key in TERMS:
        raise ValueError(f"term {spec.key!r} is already registered")
    TERMS[spec.key] = spec
    return spec


def unregister(key: str) -> TermSpec:
    """Remove a term (tests that register their own terms clean up with this)."""
    return TERMS.pop(key)


def select(**facts) -> tuple[str, ...]:
    """Keys of the terms whose fields equal ``facts``, in registry order, e.g.
    ``select(temperature=True)`` -> ``("ce", "kl", "rtd_kl")``."""
    names = {f.name for f in fields(TermSpec)}
    unknown = sorted(set(facts) - names)
    if unknown:
        raise TypeError(f"select(): TermSpec has no field(s) {', '.join(unknown)}")
    return tuple(k for k, s in TERMS.items() if all(getattr(s, f) == v for f, v in facts.items()))


def level_terms(sequence_level: bool) -> tuple[str, ...]:
    """The terms that exist in task (sequence-level) or in pre-training (token-level) distillation."""
    return select(sequence_level=True) if sequence_level else select(token_level=True)


def takes_temperature(weights: Mapping[str, float]) -> bool:
    """Whether any active (weight > 0) registered term of ``weights`` uses the temperature."""
    return any(k in TERMS and TERMS[k].temperature and w for k, w in weights.items())


def format_weights(weights: Mapping[str, float]) -> str:
    """``{"ce": 5, "mlm": 2}`` -> ``'{"ce": 5, "mlm": 2}'`` (JSON with ``%g`` numbers, for messages)."""
    return "{" + ", ".join(f'"{k}": {w:g}' for k, w in weights.items()) + "}"


# -----------------------------------------------------------------------------------------
# validation, once for every caller (config, objective, glue-eval)


def check_weights(weights, *, sequence_level: bool | None = None, what: str = "loss weights") -> dict[str, float]:
    """The active (weight > 0) terms of a ``{term: weight}`` mapping, as floats.

    Every key must be a registered term (at ``sequence_level``, when given, one that exists
    at that level) and every weight a finite number >= 0, with at least one above 0.
    Anything else is one :class:`UsageError` line that names the value and the fix.
    """
    example = format_weights(TASK_WEIGHTS if sequence_level else DISTILBERT_WEIGHTS)
    if not isinstance(weights, Mapping) or not weights:
        raise UsageError(f"{what} {weights!r} must be a non-empty mapping of term -> weight, e.g. {example}")
    valid = TERMS if sequence_level is None else level_terms(sequence_level)
    active = {}
    for name, weight in weights.items():
        if name not in valid:
            if sequence_level and name in TERMS:
                raise UsageError(
                    f"{what}: term {name!r} is not a task-distillation term; use {', '.join(valid)}")
            raise UsageError(f"unknown loss term {name!r}: valid terms are {', '.join(valid)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UsageError(f"weight of {name!r} is {weight!r}: give a finite number >= 0")
        if weight < 0:
            raise UsageError(f"weight of {name!r} is {weight}: weights must be >= 0 (0 turns a term off)")
        if weight > 0:
            active[name] = float(weight)
    if not active:
        raise UsageError(f"all loss weights are zero ({weights!r}): give at least one term a weight > 0")
    return active


# -----------------------------------------------------------------------------------------
# the entries


def _ce(zs, zt, c):
    return losses.soft_cross_entropy(zs, zt, c.temperature)


def _kl(zs, zt, c):
    return losses.kl_divergence(zs, zt, c.temperature)


def _out_mse(zs, zt, c):
    return losses.logits_mse(zs, zt)


def _mlm(zs, zt, c):
    return losses.mlm_loss(zs, c.targets("mlm_labels"))


def _ce_grad(zs, zt, c, scale, out):
    return losses.soft_cross_entropy_grad(zs, zt, c.temperature, scale, out)


def _kl_grad(zs, zt, c, scale, out):
    return losses.kl_divergence_grad(zs, zt, c.temperature, scale, out)


def _out_mse_grad(zs, zt, c, scale, out):
    return losses.logits_mse_grad(zs, zt, scale, out)


def _mlm_grad(zs, zt, c, scale, out):
    return losses.mlm_loss_grad(zs, c.targets("mlm_labels"), scale, out)


def _hard_ce(zs, zt, c):
    return losses.hard_cross_entropy(zs, c.targets("labels"))


def _rtd(zs, zt, c):
    return losses.rtd_loss(zs, c.targets("replaced_labels"))


def _rtd_kl(zs, zt, c):
    return losses.rtd_kl(zs, zt, c.temperature)


def _relation(xs, xt, c):
    return losses.relation_kl(xs, xt, c.mask, c.relation_heads)


def masked(loss: Callable) -> Callable:
    """A representation loss ``loss(student, teacher, mask)`` of :mod:`distill.objective.losses` as a term:
    ``(student, teacher, ctx)``, over the real tokens of ``ctx.mask``."""

    def term(student, teacher, ctx: TermContext):
        return loss(student, teacher, ctx.mask)

    term.__name__ = term.__qualname__ = loss.__name__
    term.__doc__ = loss.__doc__
    return term


def pooled(loss: Callable) -> Callable:
    """A sentence-embedding loss ``loss(student, teacher, mask, modes, normalize)`` as a term, pooling as
    ``ctx.sentence_pooling`` says (default: mean, not normalised)."""

    def term(student, teacher, ctx: TermContext):
        how = ctx.sentence_pooling or {}
        return loss(student, teacher, ctx.mask, tuple(how.get("modes", ("mean",))), bool(how.get("normalize", False)))

    term.__name__ = term.__qualname__ = loss.__name__
    term.__doc__ = loss.__doc__
    return term


_MLM = frozenset({"mlm"})
_RTD = frozenset({"rtd"})
_RELATION = ("KL between `softmax(x_r x_rᵀ / √d)` of teacher and student, `x` = one layer's {} split into "
             "`relation_heads` heads of each model's own size `d`, over real keys")
_RELATION_OVER = "real query rows and relation heads; student last layer vs `relation_teacher_layer`"
_SOFT_OVER = "real tokens (masked targets only with `restrict_ce_to_mask`); examples at sequence level"

for _spec in (
    TermSpec("ce", "logits", _ce, "soft-target cross-entropy (DistilBERT's `L_ce`)",
             "`T² · −Σ_v p_t(v) log p_s(v)`", _SOFT_OVER, temperature=True, input=MASKED_INPUT,
             logits_at=SOFT, student_heads=_MLM, teacher_heads=_MLM, softmax_outputs=True, source="DistilBERT",
             row_mean="rows", logit_grad=_ce_grad),
    TermSpec("kl", "logits", _kl, "KL divergence to the teacher's soft targets",
             "`T² · Σ_v p_t(v) log(p_t(v) / p_s(v))`", "as `ce`", temperature=True, input=MASKED_INPUT,
             logits_at=SOFT, student_heads=_MLM, teacher_heads=_MLM, softmax_outputs=True, source="Hinton et al.",
             row_mean="rows", logit_grad=_kl_grad),
    TermSpec("out_mse", "logits", _out_mse, "MSE between raw logits (the soft term that fits a regression head)",
             "`(z_s − z_t)²`", "as `ce`, and over the logit entries", input=MASKED_INPUT, logits_at=SOFT,
             student_heads=_MLM | _RTD, teacher_heads=_MLM | _RTD, same_head=True, source="Hentschel et al.",
             row_mean="rows", logit_grad=_out_mse_grad),
    TermSpec("mlm", "logits", _mlm, "masked-LM loss against the original tokens",
             "`−log p_s(token)` at `T = 1`", "masked targets (`mlm_labels ≠ −100`)", teacher=False,
             input=MASKED_INPUT, logits_at=MASKED, student_heads=_MLM, sequence_level=False, source="BERT",
             row_mean="mlm_labels", logit_grad=_mlm_grad),
    TermSpec("hard_ce", "logits", _hard_ce, "task loss against gold labels",
             "cross-entropy; MSE against float labels for a 1-column (regression) head",
             "examples (labels ≠ −100)", teacher=False, logits_at=SEQUENCE, token_level=False),
    TermSpec("rtd", "logits", _rtd, "replaced-token detection (the ELECTRA discriminator's own loss)",
             "`−y log q_s − (1−y) log(1−q_s)` at `T = 1`", "real tokens", teacher=False,
             input=CORRUPTED_INPUT, logits_at=REAL, student_heads=_RTD, sequence_level=False, source="ELECTRA"),
    TermSpec("rtd_kl", "logits", _rtd_kl, "soft targets of the ELECTRA discriminator",
             "`T² · [q_t log(q_t/q_s) + (1−q_t) log((1−q_t)/(1−q_s))]`", "real tokens", temperature=True,
             input=CORRUPTED_INPUT, logits_at=REAL, student_heads=_RTD, teacher_heads=_RTD, sequence_level=False,
             source="Hentschel et al."),
    TermSpec("cos", "hidden", masked(losses.cosine_loss), "cosine distance of the last hidden states (DistilBERT's `L_cos`)",
             "`1 − cos(W h_s, h_t)`", "real tokens", layers="last", projects=True, source="DistilBERT"),
    TermSpec("hid_mse", "hidden", masked(losses.hidden_mse), "hidden-state MSE",
             "`(W h_s − h_t)²`", "real tokens and hidden features; mean over the layer-map pairs",
             layers="map", projects=True, source="TinyBERT"),
    TermSpec("emb_mse", "hidden", masked(losses.hidden_mse), "embedding-output MSE",
             "as `hid_mse`, at layer 0 ↔ 0", "real tokens and features", layers="embeddings", projects=True,
             source="TinyBERT"),
    TermSpec("att_mse", "attentions", masked(losses.attention_mse), "attention-map MSE, on probabilities",
             "`(a_s − a_t)²`", "entries whose query **and** key are real tokens, all heads; mean over the "
             "layer-map pairs", layers="map", source="TinyBERT"),
    TermSpec("att_kl", "attentions", masked(losses.attention_kl), "attention-map KL",
             "`Σ_key a_t log(a_t / a_s)` per query row", "real query rows and heads; mean over the layer-map pairs",
             layers="map", source="MiniLM"),
    TermSpec("val_kl", "values", masked(losses.value_relation_kl), "value-relation KL",
             "KL between `softmax(V Vᵀ / √d)` of teacher and student, per head and query row, over real keys "
             "(`d` = each model's head size)", "real query rows and heads; last layers", layers="last",
             source="MiniLM"),
    TermSpec("sent_mse", "hidden", pooled(losses.sentence_mse), "sentence-embedding MSE: the student's "
             "pooled sentence embedding against the teacher's", "`(pool(W h_s) − pool(h_t))²`, pooled (and "
             "normalised) as the teacher's sentence-transformers pipeline: mean, CLS, max", "sentences and "
             "embedding features; last layers", layers="last", projects=True, sequence_level=False, pooled=True,
             source="Reimers & Gurevych 2020"),
    TermSpec("sent_cos", "hidden", pooled(losses.sentence_cosine), "cosine distance of the pooled sentence "
             "embeddings", "`1 − cos(pool(W h_s), pool(h_t))`", "sentences; last layers", layers="last",
             projects=True, sequence_level=False, pooled=True, source="sentence-transformers"),
    *(TermSpec(key, "qkv", _relation, f"{what} self-attention relation KL", _RELATION.format({"query": "queries", "key": "keys", "value": "values"}[vec]), _RELATION_OVER,
               layers="relation", vectors=vec, sequence_level=False, source="MiniLMv2")
      for key, vec, what in (("qq_rel", "query", "query-query"), ("kk_rel", "key", "key-key"),
                             ("vv_rel", "value", "value-value"))),
):
    register(_spec)
del _spec

# Named objectives that defaults, examples and messages quote.
DISTILBERT_WEIGHTS = {"ce": 5.0, "mlm": 2.0, "cos": 1.0}  # Sanh et al. 2019, at T = 2
REPRESENTATION_WEIGHTS = {"cos": 1.0, "hid_mse": 1.0, "att_mse": 1.0}  # needs no head: the demo and the default
TASK_WEIGHTS = {"kl": 1.0, "hard_ce": 1.0}  # glue-eval --teacher's default (TinyBERT's prediction layer)
RELATION_WEIGHTS = {"qq_rel": 1.0, "kk_rel": 1.0, "vv_rel": 1.0}  # MiniLMv2 (Wang et al. 2021)
RELATION_HEADS = 48  # MiniLMv2's relation heads for base-size teachers (64 for large ones)


# -----------------------------------------------------------------------------------------
# derived text: help lines and the docs table


def term_list(keys) -> str:
    """``("ce", "kl")`` -> ``"ce, kl"`` (for help texts)."""
    return ", ".join(keys)


_HEAD_WORDS = {"mlm": "masked-LM", "rtd": "discriminator"}


def _heads(spec: TermSpec) -> str:
    def words(heads):
        return " or ".join(_HEAD_WORDS[h] for h in sorted(heads)) if heads else "any"

    if spec.student_heads is None and spec.teacher_heads is None:
        return "any"
    if not spec.teacher:
        return f"student: {words(spec.student_heads)}"
    if spec.student_heads == spec.teacher_heads:
        return f"both: {words(spec.student_heads)}" + (" (the same on both)" if spec.same_head else "")
    return f"student: {words(spec.student_heads)}; teacher: {words(spec.teacher_heads)}"


_LAYER_WORDS = {None: "—", "map": "layer map", "last": "last ↔ last", "embeddings": "0 ↔ 0",
                "relation": "last ↔ `relation_teacher_layer`"}


def markdown() -> str:
    """The generated part of docs/objective.md: the terms table and the lists derived from it."""
    rows = [
        "| key | what it is | value | averaged over | input (token level) | levels | heads (token level) "
        "| layers | from |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in TERMS.items():
        rows.append(f"| `{key}` | {s.doc} | {s.formula} | {s.over} | {s.input if s.token_level else '—'} | "
                    f"{s.levels} | {_heads(s) if s.token_level else '—'} | {_LAYER_WORDS[s.layers]} | "
                    f"{s.source or '—'} |")

    def keys(names):
        return ", ".join(f"`{k}`" for k in names) or "none"

    lines = [
        *rows, "",
        f"- Take the temperature `T` (and are multiplied by `T²`): {keys(select(temperature=True))}.",
        f"- Need masked input (DistilBERT's masking; both models read the same masked text): "
        f"{keys(select(input=MASKED_INPUT, token_level=True))}.",
        f"- Need corrupted input (an ELECTRA generator): {keys(select(input=CORRUPTED_INPUT, token_level=True))}. "
        "A recipe with a generator feeds every term the corrupted input.",
        f"- Exist in task (sequence-level) distillation, `glue-eval --teacher`: {keys(level_terms(True))}.",
        f"- Exist in pre-training (token-level) distillation, `distill-train`: {keys(level_terms(False))}.",
        f"- Read only the student (no teacher forward needed for them): {keys(select(teacher=False))}.",
        f"- Compare heads one to one (student and teacher need the same number of heads): "
        f"{keys(k for k, s in TERMS.items() if s.feature in PER_HEAD)}.",
        f"- Go through a learned width projection when the widths differ: {keys(select(projects=True))}.",
        f"- Follow the layer map: {keys(select(layers='map'))}.",
        f"- Pool the last hidden states into sentence embeddings as the teacher's sentence-transformers "
        f"pipeline does (its Pooling modes and Normalize; mean for a plain teacher): {keys(select(pooled=True))}.",
        f"- Are a mean over logit rows, so they run over a vocabulary head chunk by chunk, never holding "
        f"`[tokens, vocab]` logits (`logit_chunk_rows`; on when every active logit term is one of them): "
        f"{keys(k for k, s in TERMS.items() if s.row_mean)}.",
        f"- Give their own gradient over a chunk of rows (`logit_grad`: no autograd graph over the logits): "
        f"{keys(k for k, s in TERMS.items() if s.logit_grad)}.",
    ]
    return "\n".join(lines) + "\n"


BEGIN = "<!-- BEGIN TERMS: generated by `python -m distill.objective.terms --write docs/objective.md`; do not edit -->"
END = "<!-- END TERMS -->"


def page_with_table(page: str) -> str:
    """``page`` with the text between :data:`BEGIN` and :data:`END` replaced by :func:`markdown`."""
    if page.count(BEGIN) != 1 or page.count(END) != 1 or page.index(BEGIN) > page.index(END):
        raise UsageError(f"the page must hold one {BEGIN!r} line and one {END!r} line after it")
    head, rest = page.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{markdown()}{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.objective.terms", description="The loss-term registry as markdown.")
    p.add_argument("--markdown", action="store_true", help="print the terms table")
    p.add_argument("--write", metavar="PAGE", help="regenerate the table inside PAGE (e.g. docs/objective.md)")
    args = p.parse_args(argv)
    if args.write:
        from distill.common.io import atomic_write_text

        try:
            with open(args.write, encoding="utf-8") as f:
                page = f.read()
        except OSError as err:
            raise UsageError(f"--write {args.write!r}: {err.strerror}: give the page that holds the table "
                             "(e.g. docs/objective.md)") from None
        atomic_write_text(args.write, page_with_table(page))
    if args.markdown or not args.write:
        print(markdown(), end="")
    return 0


if __name__ == "__main__":
    from distill.common.errors import cli_entry

    raise SystemExit(cli_entry(main)())
