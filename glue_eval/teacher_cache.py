"""Teacher outputs computed once per training example, so a distillation epoch costs one student step per batch.

The teacher is frozen and in eval mode, so its outputs for an example never change:
TinyBERT's task stage (many epochs over an augmented set) would otherwise run the
teacher forward again for every batch of every epoch. :class:`TeacherCache` holds

- the task logits ``[N, classes]`` of every row, always (a few bytes per example);
- the representations the active terms read (hidden states, attention probabilities,
  value vectors of the teacher layers in the layer map), only when their float32 size
  fits in ``limit_mb`` MiB; otherwise the trainer runs the teacher for those each step.

Rows are the training set's row numbers (its ``row`` column); representations are kept
for real tokens only and put back into the padded ``[B, S, ...]`` layout of each batch,
so they equal a fresh teacher forward on that batch (padding never counts in a loss).

Several teachers mixed on their logits alone are one teacher here (the mixture's logits). Several teachers
whose representation terms are each their own (:func:`glue_eval.teachers.mixture_objective`) get one cache
each (:func:`build_each`): each teacher's logits, and its representations when all of them fit the limit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from distill.models.layers import attention_index, hidden_index
from distill.models.loading import Features, extract, hidden_size, num_heads, num_layers

# Representations larger than this (float32 MiB) are recomputed each step instead of cached.
DEFAULT_LIMIT_MB = 2048


@dataclass(frozen=True)
class CachePlan:
    """What to keep per row. hidden / attentions: 1-based teacher layers (0 = embeddings, hidden only);
    values: 1-based layers of value vectors."""

    hidden: tuple[int, ...] = ()
    attentions: tuple[int, ...] = ()
    values: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.hidden or self.attentions or self.values)


def plan_for(objectives) -> CachePlan:
    """The teacher layers any of ``objectives`` (:class:`distill.objective.plan.Objective`, None skipped) reads.

    Every teacher layer of a layer pair is kept for each feature kind the objective asks the
    teacher for (a slight over-approximation when two kinds map different layers: never too little).
    """
    hidden, attentions, values = set(), set(), set()
    for objective in objectives:
        if objective is None:
            continue
        request = objective.requests()["teacher"]
        layers = {t for pairs in objective.layer_pairs.values() for _, t in pairs}
        if request.hidden:
            hidden |= layers
        if request.attentions:
            attentions |= {t for t in layers if t >= 1}
        values |= set(request.value_layers)
    return CachePlan(tuple(sorted(hidden)), tuple(sorted(attentions)), tuple(sorted(values)))


def representation_bytes(lengths, plan: CachePlan, config) -> int:
    """float32 bytes of ``plan``'s tensors over rows of ``lengths`` real tokens."""
    width, heads = hidden_size(config), num_heads(config)
    tokens = sum(int(n) for n in lengths)
    squares = sum(int(n) ** 2 for n in lengths)
    per_width = (len(plan.hidden) + len(plan.values)) * tokens * width
    return 4 * (per_width + len(plan.attentions) * heads * squares)


@dataclass
class TeacherCache:
    """Per-row teacher outputs. logits: ``[N, classes]`` float32 (CPU). hidden / values: layer -> list of
    ``[S_i, H]`` / ``[heads, S_i, d]``; attentions: layer -> list of ``[heads, S_i, S_i]`` (real tokens only)."""

    logits: torch.Tensor
    plan: CachePlan = field(default_factory=CachePlan)
    hidden: dict = field(default_factory=dict)
    attentions: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    num_layers: int = 0

    @property
    def has_representations(self) -> bool:
        return not self.plan.empty

    @classmethod
    def build(cls, teacher, dataset, collate, plan: CachePlan, *, limit_mb: float = DEFAULT_LIMIT_MB,
              batch_size: int = 64, device=None, autocast=contextlib.nullcontext) -> "TeacherCache":
        """Run ``teacher`` once over every row of ``dataset`` (tokenized: ``input_ids``, ``attention_mask``,
        maybe ``token_type_ids``), in length order to keep padding small.

        collate: list of row dicts -> padded batch of tensors (e.g. ``DataCollatorWithPadding``).
        plan: the representations the terms read; dropped (logits only) if over ``limit_mb``.
        autocast: a zero-argument context factory the teacher runs under (its training precision).
        """
        device = device or next(teacher.parameters()).device
        lengths = [len(ids) for ids in dataset["input_ids"]]
        if representation_bytes(lengths, plan, teacher.config) > limit_mb * 2**20:
            plan = CachePlan()
        columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
        rows = dataset.select_columns(columns)
        n = len(rows)
        logits = None
        kept = {"hidden": {t: [None] * n for t in plan.hidden}, "attentions": {t: [None] * n for t in plan.attentions},
                "values": {t: [None] * n for t in plan.values}}
        order = sorted(range(n), key=lambda i: lengths[i])
        teacher.eval()
        for start in range(0, n, batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in chunk]).items()}
            with torch.no_grad(), autocast():
                out = extract(teacher, batch["input_ids"], batch["attention_mask"],
                              token_type_ids=batch.get("token_type_ids"), hidden=bool(plan.hidden),
                              attentions=bool(plan.attentions), value_layers=plan.values, sequence_logits=True)
            z = out.logits.float().cpu()
            if logits is None:
                logits = torch.empty(n, z.shape[1], dtype=torch.float32)
            logits[chunk] = z
            real = batch["attention_mask"].bool().cpu()
            for b, row in enumerate(chunk):
                keep = real[b]
                for t in plan.hidden:
                    kept["hidden"][t][row] = out.hidden_states[hidden_index(t)][b].float().cpu()[keep].clone()
                for t in plan.attentions:
                    a = out.attentions[attention_index(t)][b].float().cpu()
                    kept["attentions"][t][row] = a[:, keep][:, :, keep].clone()
                for t in plan.values:
                    kept["values"][t][row] = out.values[t][b].float().cpu()[:, keep].clone()
        if logits is None:
            logits = torch.empty(0, teacher.config.num_labels)
        return cls(logits, plan, kept["hidden"], kept["attentions"], kept["values"], num_layers(teacher.config))

    def features(self, rows: torch.Tensor, attention_mask: torch.Tensor) -> Features:
        """The teacher's :class:`Features` for a batch of training rows, in its padded layout.

        rows: ``[B]`` row numbers; attention_mask: ``[B, S]`` of the batch (1 = real token).
        Positions outside the mask are zero: no loss reads them.
        """
        device = attention_mask.device
        real = attention_mask.bool()
        rows = rows.tolist()
        b, s = real.shape
        hidden = attentions = None
        if self.plan.hidden:
            hidden = [None] * (self.num_layers + 1)
            for t, per_row in self.hidden.items():
                x = torch.zeros(b, s, per_row[rows[0]].shape[-1], device=device)
                for i, r in enumerate(rows):
                    x[i][real[i]] = per_row[r].to(device)
                hidden[hidden_index(t)] = x
            hidden = tuple(hidden)
        if self.plan.attentions:
            attentions = [None] * self.num_layers
            for t, per_row in self.attentions.items():
                heads = per_row[rows[0]].shape[0]
                x = torch.zeros(b, heads, s, s, device=device)
                for i, r in enumerate(rows):
                    p = real[i].nonzero().squeeze(1)
                    x[i][:, p[:, None], p[None, :]] = per_row[r].to(device)
                attentions[attention_index(t)] = x
            attentions = tuple(attentions)
        values = {}
        for t, per_row in self.values.items():
            heads, _, d = per_row[rows[0]].shape
            x = torch.zeros(b, heads, s, d, device=device)
            for i, r in enumerate(rows):
                x[i][:, real[i]] = per_row[r].to(device)
            values[t] = x
        return Features(hidden_states=hidden, attentions=attentions, values=values,
                        logits=self.logits[rows].to(device))


def build_each(teachers: list, dataset, collate, plans: list[CachePlan], *, limit_mb: float = DEFAULT_LIMIT_MB,
               **options) -> list[TeacherCache]:
    """One :class:`TeacherCache` per teacher (``plans[k]``: what teacher k's own terms read). The representations
    are kept only if every teacher's fit ``limit_mb`` MiB together; otherwise each cache holds its teacher's logits
    alone (and the trainer runs the teachers for their representations). ``options``: as :meth:`TeacherCache.build`."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    total = sum(representation_bytes(lengths, plan, t.config) for t, plan in zip(teachers, plans))
    if total > limit_mb * 2**20:
        plans = [CachePlan()] * len(teachers)
    return [TeacherCache.build(t, dataset, collate, plan, limit_mb=limit_mb, **options)
            for t, plan in zip(teachers, plans)]
