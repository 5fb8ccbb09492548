"""A gated mixture of teachers: a small gating network weighs the teachers per example (``--teacher_gate``).

The gate is a small encoder built by the toolkit's own layer selection (``--gate_layers`` of the first teacher's
encoder, :func:`distill.models.student.build_student`), mean-pooled over real tokens, then a dense layer and a
softmax over the teachers. It is trained before the student, with the teachers frozen (their logits computed once),
on the task loss of the mixture it makes, ``-log sum_k g_k(x) softmax(z_k(x))[y]`` (a one-output head: the
squared error of ``sum_k g_k z_k``), plus ``--gate_balance`` times the load-balancing loss of Shazeer et al. (2017),
the squared coefficient of variation of the teachers' importance (their summed gate weights over a batch). Without
that term a gate tends to settle on one teacher: the per-teacher share of the training set is printed and recorded
after every gate epoch so a collapse shows. The student then distils from the gated mixture (``top1``: each example
from its one highest-weighted teacher), as from fixed weights (:mod:`glue_eval.teachers`).

Extractive QA gates per training window, the unit that the span loss, the teachers' span logits and the student's
distillation already work in (an example's windows see different text, and the answer is inside only some of them):
the gate reads the window and weighs the teachers' start and end distributions over its real tokens; its task loss
is the mixture's span loss, ``-log sum_k g_k softmax(z_k)[gold]`` at the gold start and at the gold end (the
classifier token for a window without the answer), averaged (:class:`SpanTargets`, built by
:func:`glue_eval.qa_distill.span_targets`). One gate, one loop: only the targets and the loss's head type differ.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from distill.common.errors import UsageError

from .teachers import PAD_LOGIT, TeacherMixture

GATES = ("none", "softmax", "top1")


def load_balancing_loss(gates: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``CV(importance)^2``: importance ``[K]`` = the gate weights ``[B, K]`` summed over the batch; the squared
    coefficient of variation is its (population) variance over its squared mean (tensor2tensor's ``cv_squared``)."""
    importance = gates.float().sum(0)
    if importance.numel() < 2:
        return importance.sum() * 0.0
    return importance.var(unbiased=False) / (importance.mean() ** 2 + eps)


def mixture_task_loss(teacher_logits: torch.Tensor, gates: torch.Tensor, labels: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The task loss of the gated mixture, by the head: gates ``[B, K]``; ``teacher_logits`` ``[K, B, C]`` and
    ``labels`` ``[B]`` (a sentence head), or ``[K, B, 2, S]`` start/end logits and ``labels`` ``[B, 2]``, the gold
    start and end tokens (a span head; padding, where ``attention_mask`` ``[B, S]`` is 0, holds no mass).
    Classes: mean of ``-log sum_k g_k softmax(z_k)[y]``; span: the same at the gold start and at the gold end over
    each window's real tokens, averaged (the mixture's span loss); one output (C = 1): mean of
    ``(sum_k g_k z_k - y)^2``."""
    g = gates.float().t()  # [K, B]
    z = teacher_logits.float()
    if z.dim() == 4:  # a span head: one gate weight per window, for its start and its end
        g = g[..., None]
        if attention_mask is not None:
            z = z.masked_fill(~attention_mask.bool()[None, :, None, :], PAD_LOGIT)
    elif z.shape[-1] == 1:
        prediction = (g * z[..., 0]).sum(0)
        return ((prediction - labels.float()) ** 2).mean()
    log_p = torch.log_softmax(z, -1)  # [K, B, (2,) C]
    index = labels.long().to(z.device)[None, ..., None].expand(*log_p.shape[:-1], 1)
    gold = log_p.gather(-1, index)[..., 0]  # [K, B] or [K, B, 2]
    return -torch.logsumexp(torch.log(g.clamp_min(1e-30)) + gold, dim=0).mean()


@dataclass
class ClassTargets:
    """What a sentence task's gate learns against: every teacher's logits on every training row ``[K, N, C]``
    and the gold labels ``[N]``."""

    logits: torch.Tensor
    labels: torch.Tensor

    def batch(self, rows: list[int], attention_mask: torch.Tensor):
        """``(teacher logits [K, B, C], labels [B])`` of ``rows``, on the batch's device."""
        device = attention_mask.device
        return self.logits[:, rows].to(device), self.labels[rows].to(device)


@dataclass
class SpanTargets:
    """What an extractive-QA gate learns against, per training window: every teacher's start/end logits (one cache
    per teacher, as :class:`glue_eval.qa_distill.SpanLogitCache`: ``features(rows, attention_mask).logits`` is
    ``[B, 2, S]`` in the batch's padded layout) and the gold start and end tokens ``[N, 2]`` (the classifier token
    for a window that does not hold the answer)."""

    caches: list
    positions: torch.Tensor

    def batch(self, rows: list[int], attention_mask: torch.Tensor):
        """``(teacher start/end logits [K, B, 2, S], gold [B, 2])`` of ``rows``; padding is masked by the loss."""
        index = torch.tensor(rows)
        z = torch.stack([cache.features(index, attention_mask).logits for cache in self.caches])
        return z, self.positions[rows].to(attention_mask.device)


class TeacherGate(nn.Module):
    """encoder -> mean over real tokens -> dense -> softmax over the K teachers: ``[B, K]`` weights."""

    def __init__(self, encoder, num_teachers: int):
        super().__init__()
        self.encoder = encoder
        self.dense = nn.Linear(encoder.config.hidden_size, num_teachers)
        self.top1 = False

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        m = attention_mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        gates = torch.softmax(self.dense(pooled).float(), -1)
        if self.top1 and not self.training:  # one expert per example
            gates = nn.functional.one_hot(gates.argmax(-1), gates.shape[-1]).to(gates.dtype)
        return gates


class GatedTeacherMixture(TeacherMixture):
    """:class:`glue_eval.teachers.TeacherMixture` whose weights come from a fitted :class:`TeacherGate` per example."""

    def __init__(self, mixture: TeacherMixture, gate: TeacherGate):
        super().__init__(list(mixture.teachers), mixture.weights.tolist(), mixture.temperature)
        self.gate = gate.eval()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        types = kwargs.get("token_type_ids")
        self.weights = self.gate(input_ids, attention_mask, types)  # [B, K], read by mix_logits
        try:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.weights = None


def build_gate(mixture: TeacherMixture, layers: str, seed: int) -> TeacherGate:
    """A gate whose encoder keeps ``layers`` (1-based) of the first teacher's encoder."""
    from distill.models.student import build_student

    torch.manual_seed(seed)
    try:
        encoder, _ = build_student(mixture.teachers[0].base_model, layers)
    except UsageError as err:
        raise UsageError(f"--gate_layers {layers}: {err}") from None
    torch.manual_seed(seed)
    return TeacherGate(encoder, len(mixture.teachers))


def class_targets(mixture: TeacherMixture, train, collate, args) -> ClassTargets:
    """A sentence task's gate targets: every teacher's logits on every training row (``[K, N, C]``, computed once,
    as the teacher cache does) and the rows' ``label``."""
    from .teacher_cache import CachePlan, TeacherCache
    from .trainer import teacher_autocast

    logits = torch.stack([TeacherCache.build(t, train, collate, CachePlan(), batch_size=args.per_device_eval_batch_size,
                                             device=args.device, autocast=lambda: teacher_autocast(args)).logits
                          for t in mixture.teachers])
    return ClassTargets(logits, torch.tensor(train["label"]))


def fit_gate(mixture: TeacherMixture, train, collate, args, glue,
             targets_of=class_targets) -> tuple[GatedTeacherMixture, dict]:
    """Train a gate on the rows of ``train`` against ``targets_of(mixture, train, collate, args)`` (the teachers'
    outputs, computed once, and the gold labels: :class:`ClassTargets` or :class:`SpanTargets`); the gated mixture
    and the gate's record (per epoch: task loss, load-balancing loss, each teacher's share)."""
    mixture.to(args.device)
    targets = targets_of(mixture, train, collate, args)
    gate = build_gate(mixture, glue.gate_layers, args.seed).to(args.device)
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in train.column_names]
    epochs = train_gate(gate, train.select_columns(columns), targets, collate,
                        GateSchedule(int(max(1, glue.gate_epochs)), glue.gate_learning_rate, glue.gate_balance,
                                     args.per_device_train_batch_size, args.seed), args.device)
    gate.top1 = glue.teacher_gate == "top1"
    record = {"kind": glue.teacher_gate, "layers": glue.gate_layers, "balance_weight": glue.gate_balance,
              "rows": len(train), "epochs": epochs}
    return GatedTeacherMixture(mixture, gate).eval(), record


@dataclass(frozen=True)
class GateSchedule:
    epochs: int
    learning_rate: float
    balance: float  # weight of the load-balancing loss
    batch_size: int
    seed: int


def _batches(rows, collate, order: list[int], size: int, device):
    """``(row indices, model inputs on device)`` of consecutive chunks of ``order``."""
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        yield chunk, {k: v.to(device) for k, v in collate([rows[i] for i in chunk]).items()}


def train_gate(gate: TeacherGate, rows, targets, collate, schedule: GateSchedule, device="cpu") -> list[dict]:
    """AdamW on ``task loss of the mixture + balance * CV(importance)^2`` over shuffled batches of ``rows`` (model
    inputs) against ``targets`` (:class:`ClassTargets` or :class:`SpanTargets`: the teachers' outputs and the gold
    labels of every row); the per-epoch records (each printed)."""
    optimizer = torch.optim.AdamW(gate.parameters(), lr=schedule.learning_rate)
    generator = torch.Generator().manual_seed(schedule.seed)
    epochs = []
    for epoch in range(schedule.epochs):
        gate.train()
        order = torch.randperm(len(rows), generator=generator).tolist()
        for chunk, batch in _batches(rows, collate, order, schedule.batch_size, device):
            gates = gate(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            zt, labels = targets.batch(chunk, batch["attention_mask"])
            task = mixture_task_loss(zt, gates, labels, batch["attention_mask"])
            optimizer.zero_grad()
            (task + schedule.balance * load_balancing_loss(gates)).backward()
            optimizer.step()
        epochs.append(_epoch_record(gate, rows, collate, device, schedule.batch_size, targets, epoch))
        shares = " ".join(f"{s:.3f}" for s in epochs[-1]["share"])
        print(f"gate epoch {epoch + 1}: teacher shares {shares}, task loss {epochs[-1]['task_loss']:.4f}, "
              f"balance {epochs[-1]['balance']:.4f}", file=sys.stderr)
    gate.eval()
    return epochs


@torch.no_grad()
def _epoch_record(gate, rows, collate, device, size, targets, epoch) -> dict:
    """Over every row, in order: each teacher's share (its mean gate weight), the mixture's task loss (the mean over
    rows) and the load-balancing loss of the whole set."""
    gate.eval()
    every, task = [], 0.0
    for chunk, batch in _batches(rows, collate, list(range(len(rows))), size, device):
        gates = gate(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        zt, labels = targets.batch(chunk, batch["attention_mask"])
        task += float(mixture_task_loss(zt, gates, labels, batch["attention_mask"])) * len(chunk)
        every.append(gates.cpu())
    gates = torch.cat(every)
    return {"epoch": epoch + 1, "share": [round(float(x), 4) for x in gates.mean(0)],
            "task_loss": task / max(1, len(rows)), "balance": float(load_balancing_loss(gates))}


def gated_teacher(teacher, train, collate, args, glue, targets_of=class_targets):
    """``(teacher, None)`` without ``--teacher_gate``; else the gated mixture fitted on the labelled training rows
    (sentence tasks: ``targets_of`` :func:`class_targets`; extractive QA passes its span targets) and the gate's
    record."""
    if getattr(glue, "teacher_gate", "none") in ("none", None):
        return teacher, None
    if not isinstance(teacher, TeacherMixture):
        raise UsageError("--teacher_gate weighs several teachers: give --teacher more than once")
    if "labelled" in train.column_names:  # augmented and unlabelled rows have no gold label to train the gate on
        train = train.filter(lambda row: row["labelled"] == 1)
    return fit_gate(teacher, train, collate, args, glue, targets_of)
