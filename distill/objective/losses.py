"""Distillation losses: pure functions of tensors, averaged over the positions a mask keeps.

Conventions shared by every function here (the objective and the docs rely on them):

- ``mask`` is the attention mask ``[B, S]`` (nonzero = real token). ``None`` keeps
  every position, which is what already-gathered inputs (``[N, vocab]`` logits from
  :func:`distill.models.loading.extract`) and sequence-level logits ``[B, classes]`` use.
- Inputs are promoted to at least float32 inside each function and autocast is
  switched off, so a loss never runs in fp16/bf16 (float64 stays float64, which
  lets tests and ``gradcheck`` run exactly).
- Positions the mask drops are removed by selection or ``torch.where`` before any
  arithmetic, never multiplied by 0: padding that holds inf/NaN changes neither a
  loss nor its gradient.
- A loss over zero kept positions is 0 (not NaN), so a batch with no masked token
  does not poison the step.
- Soft-target terms (:func:`soft_cross_entropy`, :func:`kl_divergence`,
  :func:`rtd_kl`) are a mean over kept positions multiplied by ``T**2`` (Hinton),
  which keeps their gradient scale independent of the temperature.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.common.declare import Range

__all__ = [
    "soft_cross_entropy",
    "kl_divergence",
    "mlm_loss",
    "hard_cross_entropy",
    "cosine_loss",
    "hidden_mse",
    "attention_mse",
    "attention_kl",
    "value_relation_kl",
    "logits_mse",
    "soft_cross_entropy_grad",
    "kl_divergence_grad",
    "mlm_loss_grad",
    "logits_mse_grad",
    "rtd_loss",
    "rtd_kl",
]


# ---------------------------------------------------------------------------------------------
# helpers


def _full_precision(fn):
    """Run ``fn`` with autocast off on every device its tensor arguments live on.

    Under autocast a matmul (value relations, projections) would silently run in
    fp16/bf16 even on float32 inputs; losses must not.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)}
        with contextlib.ExitStack() as stack:
            for device in sorted(devices):
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is (never fp16/bf16)."""
    return x if x.dtype == torch.float64 else x.float()


def _mean(x: Tensor) -> Tensor:
    """Mean of all elements; 0 (still attached to the graph) for an empty tensor."""
    return x.sum() / max(x.numel(), 1)


# The temperature's one declared bound: the recipe, glue-eval's --temperature, the objective and the loss
# functions all check it here, with one message.
TEMPERATURE = Range(0, 100, low_open=True)


def check_temperature(temperature) -> float:
    """``T`` as a float, or the one :class:`UsageError` line for a temperature outside :data:`TEMPERATURE`."""
    return float(TEMPERATURE.check("temperature", temperature))


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: student shape {tuple(a.shape)} != teacher shape {tuple(b.shape)}")


def _kept_rows(x: Tensor, mask: Tensor | None, event_dims: int) -> Tensor:
    """The entries of ``x`` at kept positions, widened: ``[N, *event]``.

    ``x`` is ``[*positions, *event]`` where ``event`` is the last ``event_dims``
    dimensions (vocab, hidden or none); ``mask`` must have shape ``positions``.
    """
    event = x.shape[x.dim() - event_dims:] if event_dims else ()
    if mask is None:
        return _wide(x.reshape(-1, *event))
    lead = x.shape[: x.dim() - event_dims]
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the positions {tuple(lead)} "
            f"of an input of shape {tuple(x.shape)}"
        )
    keep = mask.to(device=x.device, dtype=torch.bool)
    if bool(keep.all()):  # nothing dropped (a packed batch): the rows as they are, no gather and no scatter back
        return _wide(x.reshape(-1, *event))
    return _wide(x[keep])


def _kept_pair(student: Tensor, teacher: Tensor, mask: Tensor | None, event_dims: int, what: str):
    _check_same_shape(student, teacher, what)
    return _kept_rows(student, mask, event_dims), _kept_rows(teacher, mask, event_dims)


def _token_mask(mask: Tensor | None, batch: int, seq: int, device) -> Tensor:
    """Bool ``[B, S]`` mask (all True for ``None``)."""
    if mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if tuple(mask.shape) != (batch, seq):
        raise ValueError(f"mask shape {tuple(mask.shape)} != (batch, seq) = {(batch, seq)}")
    return mask.to(device=device, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# output (logit) terms


@_full_precision
def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """Soft-target cross-entropy ``T^2 * mean_kept( -sum_v p_t(v) log p_s(v) )``, ``p = softmax(z / T)``.

    The ``L_ce`` term of the DistilBERT paper. It equals :func:`kl_divergence` plus the
    teacher's tempered entropy (times ``T^2``), so it does not go to 0 when the student
    matches the teacher; its gradient w.r.t. the student is the same as the KL's.

    Args:
        student_logits, teacher_logits: ``[B, S, V]`` with ``mask`` ``[B, S]``, or
            ``[N, V]`` (gathered rows) / ``[B, classes]`` with ``mask=None``.
        temperature: ``T > 0``.
        mask: nonzero where a position counts.

    Returns:
        scalar, nats times ``T^2``.
    """
    t = check_temperature(temperature)
    s, te = _kept_pair(student_logits, teacher_logits, mask, 1, "soft_cross_entropy")
    log_p_s = F.log_softmax(s / t, dim=-1)
    p_t = F.softmax(te / t, dim=-1)
    return _mean(-(p_t * log_p_s).sum(dim=-1)) * t**2


@_full_precision
def kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """``T^2 * mean_kept( KL(p_t || p_s) )`` with ``p = softmax(z / T)``.

    What DistilBERT's code computes for its "ce" term (``KLDivLoss(batchmean) * T^2``).
    Shapes as :func:`soft_cross_entropy`. Returns a scalar, nats times ``T^2``; 0 iff the
    tempered distributions agree at every kept position.
    """
    t = check_temperature(temperature)
    s, te = _kept_pair(student_logits, teacher_logits, mask, 1, "kl_divergence")
    log_p_s = F.log_softmax(s / t, dim=-1)
    log_p_t = F.log_softmax(te / t, dim=-1)
    # exp(log p) * (difference of finite logs): no 0 * log 0 anywhere.
    return _mean((log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)) * t**2


@_full_precision
def mlm_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Masked-LM cross-entropy against the original tokens, mean over predicted positions.

    Args:
        student_logits: ``[B, S, V]`` with ``labels`` ``[B, S]``, or gathered ``[N, V]``
            with ``labels`` ``[N]``.
        labels: token ids; ``-100`` where the position is not a prediction target.

    Returns:
        scalar, nats per predicted token (0 if no position is a target).
    """
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"mlm_loss: logits {tuple(student_logits.shape)} do not match labels {tuple(labels.shape)}"
        )
    keep = labels != -100
    rows = _kept_rows(student_logits, keep, 1)
    return F.cross_entropy(rows, labels[keep].long(), reduction="sum") / max(rows.shape[0], 1)


@_full_precision
def hard_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Task loss against gold labels, as transformers' sequence-classification heads define it.

    Args:
        logits: ``[B, classes]``; with one column (``[B, 1]``) the task is regression.
        labels: ``[B]`` class ids (``-100`` = ignore), or float targets for regression.

    Returns:
        scalar: mean cross-entropy in nats over non-ignored rows, or for regression the
        mean squared error between ``logits[:, 0]`` and ``labels``.
    """
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"hard_cross_entropy: expected logits [B, classes] and labels [B], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[1] == 1:
        prediction = _wide(logits[:, 0])
        return _mean((prediction - labels.to(prediction.dtype)) ** 2)
    keep = labels != -100
    rows = _wide(logits[keep])
    return F.cross_entropy(rows, labels[keep].long(), reduction="sum") / max(rows.shape[0], 1)


@_full_precision
def logits_mse(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between raw logits, mean over kept positions and logit entries.

    Args:
        student_logits, teacher_logits: ``[B, S, V]`` (masked LM) or ``[B, S]`` (ELECTRA
            discriminator) with ``mask`` ``[B, S]``; or with ``mask=None`` any equal
            shapes (gathered ``[N, V]`` / ``[N]``, sequence-level ``[B, classes]``).

    Returns:
        scalar, squared logit units.
    """
    _check_same_shape(student_logits, teacher_logits, "logits_mse")
    # [B, S, V] logits under a [B, S] mask keep rows of V; [B, S] ELECTRA logits keep scalars.
    event = 0 if mask is None else student_logits.dim() - mask.dim()
    s, t = _kept_pair(student_logits, teacher_logits, mask, event, "logits_mse")
    return _mean((s - t) ** 2)


# ---------------------------------------------------------------------------------------------
# logit terms with their gradient, for the chunked vocabulary head
#
# Each takes one chunk of gathered rows ``[N, V]`` (no mask: every row given is a real position), and
# returns ``(value, grad)``: the term's value as the function above computes it, and
# ``out + scale * d value / d student_logits`` (``out`` None: 0), in the value's float32/float64.
# They run without autograd, as a few passes over the chunk with in-place arithmetic where it can be: the
# vocabulary head's logits are the largest tensors of a step, and autograd's formula for these terms keeps
# its intermediates and makes a fresh [N, V] tensor for each step of its backward (distill.models.vocab_head;
# ``python -m bench.logit_grad`` times the two). Values are summed pairwise, as ``.sum()`` does (a single
# float32 dot over a chunk's millions of entries is off by 1e-4). ``scale`` may be a 0-dim tensor, read
# without a host sync (mlm's selection of its target rows is its one sync). Tests check each against autograd of
# the function above, in float64.


def _add_scaled(out: Tensor | None, grad: Tensor, scale) -> Tensor:
    """``out + scale * grad``, ``grad`` (a temporary of the caller's) scaled in place."""
    if not (isinstance(scale, (int, float)) and scale == 1):
        grad.mul_(scale)
    return grad if out is None else out.add_(grad)


def _sum_of_products(a: Tensor, b: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``(a * b).sum()``, the product written into ``scratch`` (a temporary of the caller's) when given."""
    return (a * b if scratch is None else torch.mul(a, b, out=scratch)).sum()


def _logit_rows(student_logits: Tensor, teacher_logits: Tensor | None, what: str):
    if student_logits.dim() != 2:
        raise ValueError(f"{what}: expected gathered rows [N, V], got {tuple(student_logits.shape)}")
    if teacher_logits is None:
        return _wide(student_logits), None
    _check_same_shape(student_logits, teacher_logits, what)
    dtype = torch.promote_types(_wide(student_logits).dtype, _wide(teacher_logits).dtype)  # e.g. fp16 and fp32 heads
    return student_logits.to(dtype), teacher_logits.to(dtype)


def _tempered_log_softmax(z: Tensor, t: float) -> tuple[Tensor, Tensor | None]:
    """``log_softmax(z / T)`` and the ``z / T`` temporary it was taken from (None at ``T = 1``), for reuse."""
    scaled = None if t == 1 else z / t
    return F.log_softmax(z if scaled is None else scaled, dim=-1), scaled


def _soft_rows(student_logits: Tensor, teacher_logits: Tensor, temperature: float, what: str):
    """The soft-target terms' common start: ``T``, both rows widened alike, the row count (at least 1), the
    student's ``log_softmax(z / T)`` and its ``z / T`` temporary."""
    t = check_temperature(temperature)
    s, te = _logit_rows(student_logits, teacher_logits, what)
    return (t, s, te, max(s.shape[0], 1), *_tempered_log_softmax(s, t))


@_full_precision
@torch.no_grad()
def soft_cross_entropy_grad(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                            scale=1.0, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`soft_cross_entropy` of rows and its gradient: ``T (p_s − p_t) / N`` per row."""
    t, s, te, n, log_p_s, scratch = _soft_rows(student_logits, teacher_logits, temperature, "soft_cross_entropy_grad")
    p_t = F.softmax(te if t == 1 else te / t, dim=-1)
    value = -_sum_of_products(p_t, log_p_s, scratch) * (t * t / n)
    del scratch
    return value, _add_scaled(out, log_p_s.exp_().sub_(p_t), scale * (t / n))


@_full_precision
@torch.no_grad()
def kl_divergence_grad(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                       scale=1.0, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`kl_divergence` of rows and its gradient, the same as :func:`soft_cross_entropy_grad`'s."""
    t, s, te, n, log_p_s, scratch = _soft_rows(student_logits, teacher_logits, temperature, "kl_divergence_grad")
    log_p_t, _ = _tempered_log_softmax(te, t)
    p_t = log_p_t.exp()
    # sum p_t (log p_t - log p_s): the difference taken entry by entry, as kl_divergence does (no cancellation)
    value = _sum_of_products(p_t, log_p_t.sub_(log_p_s), scratch) * (t * t / n)
    del scratch, log_p_t
    return value, _add_scaled(out, log_p_s.exp_().sub_(p_t), scale * (t / n))


@_full_precision
@torch.no_grad()
def mlm_loss_grad(student_logits: Tensor, labels: Tensor, scale=1.0, out: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """:func:`mlm_loss` of rows ``[N, V]`` with labels ``[N]`` and its gradient, ``(p_s − onehot) / targets``
    at the target rows and 0 elsewhere."""
    s, _ = _logit_rows(student_logits, None, "mlm_loss_grad")
    if labels.shape != s.shape[:1]:
        raise ValueError(f"mlm_loss_grad: logits {tuple(s.shape)} do not match labels {tuple(labels.shape)}")
    keep = labels != -100
    every = bool(keep.all())
    index = None if every else keep.nonzero().squeeze(1)
    rows = s if every else s.index_select(0, index)
    targets = (labels if every else labels.index_select(0, index)).long().unsqueeze(1)
    n = max(rows.shape[0], 1)
    log_p = F.log_softmax(rows, dim=-1)
    value = -log_p.gather(1, targets).sum() / n
    grad = log_p.exp_().scatter_add_(1, targets, torch.full_like(targets, -1, dtype=log_p.dtype))
    if every:
        return value, _add_scaled(out, grad, scale / n)
    if out is None:
        out = torch.zeros_like(s)
    return value, out.index_add_(0, index, _add_scaled(None, grad, scale / n).to(out.dtype))


@_full_precision
@torch.no_grad()
def logits_mse_grad(student_logits: Tensor, teacher_logits: Tensor, scale=1.0, out: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """:func:`logits_mse` of rows and its gradient, ``2 (z_s − z_t) / (N V)``."""
    s, te = _logit_rows(student_logits, teacher_logits, "logits_mse_grad")
    count = max(s.numel(), 1)
    diff = s - te
    value = _sum_of_products(diff, diff) / count
    return value, _add_scaled(out, diff, scale * (2 / count))


# ---------------------------------------------------------------------------------------------
# representation terms


@_full_precision
def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean_kept(1 - cos(h_s, h_t))`` per position (DistilBERT's ``L_cos``).

    Args:
        student_hidden, teacher_hidden: ``[B, S, H]`` (same ``H``: project first if the
            widths differ) with ``mask`` ``[B, S]``, or ``[N, H]`` with ``mask=None``.

    Returns:
        scalar in ``[0, 2]``.
    """
    s, t = _kept_pair(student_hidden, teacher_hidden, mask, 1, "cosine_loss")
    return _mean(1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8))


@_full_precision
def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over kept positions and hidden features (TinyBERT's hidden/embedding loss).

    Args:
        student_hidden, teacher_hidden: ``[B, S, H]`` with ``mask`` ``[B, S]``, or ``[N, H]``.

    Returns:
        scalar, squared activation units (mean, not sum, over ``H``).
    """
    s, t = _kept_pair(student_hidden, teacher_hidden, mask, 1, "hidden_mse")
    return _mean((s - t) ** 2)


def _check_attention(student: Tensor, teacher: Tensor, what: str) -> None:
    _check_same_shape(student, teacher, what)
    if student.dim() != 4 or student.shape[-1] != student.shape[-2]:
        raise ValueError(f"{what}: expected [B, heads, S, S] attention, got {tuple(student.shape)}")


@_full_precision
def attention_mse(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between attention probabilities over valid entries.

    An entry (query i, key j) is valid when both tokens are real; padded query rows and
    padded key columns never count (the anchor code counted them).

    Args:
        student_attn, teacher_attn: ``[B, heads, S, S]`` probabilities (pre-dropout).
        mask: ``[B, S]``.

    Returns:
        scalar, squared probability units, mean over valid entries and heads.
    """
    _check_attention(student_attn, teacher_attn, "attention_mse")
    b, h, seq, _ = student_attn.shape
    m = _token_mask(mask, b, seq, student_attn.device)
    # nothing padded (a packed batch): every entry counts, no mask at all
    valid = None if bool(m.all()) else m[:, None, :, None] & m[:, None, None, :]  # [B, 1, S, S]: same for each head
    count = b * h * seq * seq if valid is None else int(valid.sum()) * h
    return _AttentionSquaredError.apply(student_attn, teacher_attn, valid, max(count, 1), torch.is_grad_enabled())


_SLICE_ENTRIES = 1 << 16  # entries widened at a time on a CPU: 256 KiB in float32, inside a core's L2 cache


def _slice_entries(device: torch.device) -> int | None:
    """How many map entries :class:`_AttentionSquaredError` widens at a time on ``device``; None: the whole maps
    at once (an accelerator streams whole tensors, and a kernel launch per slice would cost more than it saves)."""
    return _SLICE_ENTRIES if device.type == "cpu" else None


class _AttentionSquaredError(torch.autograd.Function):
    """``sum over valid entries of (a_s - a_t)^2 / count``, widened slice by slice on a CPU.

    The maps arrive in the compute dtype (bf16 or fp16 under mixed precision). Composed of autograd
    operations, the loss widened both maps to float32 whole, took the difference and its square, kept the
    float32 difference for the backward, and ran the square's and the cast's gradients over whole maps again.
    Here each slice of :func:`_slice_entries` is widened, differenced and squared while it sits in cache, the
    per-slice sums added in float64; the backward widens the slices again and writes ``2 (a_s - a_t) / count``
    in the input's dtype. Autograd keeps the maps it already had and no float32 copy of them (tested); the demo
    step's time does not change measurably (bench.speed's baseline section against the engine before). The
    arithmetic is float32's (float64 for float64 inputs), as before; invalid entries are selected away by
    ``where``, so padding garbage (inf, NaN) reaches neither the value nor the gradient. There is no second
    derivative: a backward with ``create_graph=True`` is refused in one line.

    ``valid``: ``[B, 1, S, S]`` bool, or None when every entry counts; ``count``: valid entries times heads.
    """

    @staticmethod
    def _slices(s: Tensor, valid: Tensor | None):
        """(index, valid slice or None) over ``[B, h, S, S]``: one batch item's heads, as many as fit; or the
        whole maps as one slice where :func:`_slice_entries` says so."""
        entries = _slice_entries(s.device)
        if entries is None:
            yield (slice(None),), valid
            return
        b, h, seq, _ = s.shape
        step = max(1, min(h, entries // max(seq * seq, 1)))
        for i in range(b):
            for j in range(0, h, step):
                yield (i, slice(j, j + step)), None if valid is None else valid[i]

    @staticmethod
    def _diff(s: Tensor, t: Tensor, index, keep: Tensor | None) -> Tensor:
        d = _wide(s[index]) - _wide(t[index])
        return d if keep is None else torch.where(keep, d, 0.0)

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, valid: Tensor | None, count: int, grad_enabled: bool):
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for index, keep in _AttentionSquaredError._slices(s, valid):
            d = _AttentionSquaredError._diff(s, t, index, keep)
            total += d.mul_(d).sum()
        if grad_enabled and any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(s, t, valid)
        ctx.count = count
        return (total / count).to(torch.promote_types(_wide(s[:0]).dtype, _wide(t[:0]).dtype))

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a silent first-order-only answer would be wrong
            raise RuntimeError("attention_mse has no second derivative (its gradient is written by hand): "
                               "take the backward without create_graph=True")
        s, t, valid = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[:2]
        slices = list(_AttentionSquaredError._slices(s, valid))
        whole = len(slices) == 1 and slices[0][0] == (slice(None),)  # an accelerator's: the gradient is the slice
        grad_s = torch.empty_like(s) if need_s and not whole else None
        grad_t = torch.empty_like(t) if need_t and not whole else None
        scale = 2.0 / ctx.count * grad_output
        for index, keep in slices:
            d = _AttentionSquaredError._diff(s, t, index, keep).mul_(scale)
            if whole:
                grad_t = (-d).to(t.dtype) if need_t else None  # a new tensor: d.to() may return d itself
                grad_s = d.to(s.dtype) if need_s else None
                continue
            if need_s:
                grad_s[index] = d
            if need_t:
                grad_t[index] = d.neg_()
        return grad_s, grad_t, None, None, None


@_full_precision
def attention_kl(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None) -> Tensor:
    """``KL(a_t || a_s)`` per query row, summed over valid keys, mean over valid rows and heads.

    The MiniLM / attention-transfer form. Rows are not renormalised over valid keys:
    transformers already gives padded keys probability 0.

    Args:
        student_attn, teacher_attn: ``[B, heads, S, S]`` probabilities (pre-dropout).
        mask: ``[B, S]``.

    Returns:
        scalar, nats per query row. Student probabilities are clamped at the smallest
        normal float so an underflowed 0 gives a large finite loss instead of inf.
    """
    _check_attention(student_attn, teacher_attn, "attention_kl")
    b, h, seq, _ = student_attn.shape
    m = _token_mask(mask, b, seq, student_attn.device)
    a_s, a_t = _wide(student_attn), _wide(teacher_attn)
    padded = not bool(m.all())  # a packed batch has nothing to drop: no where() and no gather
    if padded:
        valid = (m[:, None, :, None] & m[:, None, None, :]).expand(b, h, seq, seq)
        # where() (not * 0) so garbage in padding cannot turn into NaN, forward or backward.
        a_s, a_t = torch.where(valid, a_s, 0.0), torch.where(valid, a_t, 0.0)
    a_s = a_s.clamp_min(torch.finfo(a_s.dtype).tiny)
    per_entry = torch.xlogy(a_t, a_t) - torch.xlogy(a_t, a_s)  # 0 where a_t == 0
    per_row = per_entry.sum(dim=-1)  # [B, h, S]
    return _mean(per_row[m[:, None, :].expand(b, h, seq)] if padded else per_row)


@_full_precision
def value_relation_kl(student_values: Tensor, teacher_values: Tensor, mask: Tensor | None = None) -> Tensor:
    """MiniLM's value-relation loss: ``KL(R_t || R_s)`` per head and query row.

    ``R = softmax(V V^T / sqrt(d))`` over valid keys, with ``d`` each model's own head
    dimension, so student and teacher may differ in head size but not in head count.

    Args:
        student_values: ``[B, heads, S, d_s]`` value vectors of one student layer.
        teacher_values: ``[B, heads, S, d_t]``.
        mask: ``[B, S]``.

    Returns:
        scalar, nats per query row, mean over valid query rows and heads.
    """
    if student_values.dim() != 4 or teacher_values.dim() != 4 or student_values.shape[:3] != teacher_values.shape[:3]:
        raise ValueError(
            "value_relation_kl: expected [B, heads, S, d] values with equal B, heads and S, got "
            f"{tuple(student_values.shape)} and {tuple(teacher_values.shape)}"
        )
    b, h, seq, _ = student_values.shape
    m = _token_mask(mask, b, seq, student_values.device)
    vs, vt = _wide(student_values), _wide(teacher_values)
    padded = not bool(m.all())
    if padded:  # padded rows become 0 (finite scores everywhere); their keys are masked out below
        pos = m[:, None, :, None]
        vs, vt = torch.where(pos, vs, 0.0), torch.where(pos, vt, 0.0)
    key_invalid = ~m[:, None, None, :] if padded else None
    # grad mode is off inside a Function's forward: whether a backward can come is read here
    return _RelationKL.apply(vs, vt, key_invalid, int(m.sum()) * h, torch.is_grad_enabled())


class _RelationKL(torch.autograd.Function):
    """``sum KL(R_t || R_s) / count`` over query rows, ``R = softmax(x x^T / sqrt(d))`` over the valid keys.

    One pass of plain tensor operations, the student's (and, if it needs one, the teacher's)
    gradient taken in the forward pass, so autograd keeps none of the ``[B, h, S, S]`` maps: about
    a third of the passes over them that the same formula composed of autograd operations makes.

    ``xs``, ``xt``: ``[B, h, S, d]`` wide vectors, zero at padded positions. A padded query row is
    then uniform on both sides (KL 0, gradient 0) and needs no mask of its own; a padded key gets
    the dtype's most negative finite score (probability 0, every log finite).
    ``key_invalid``: ``[B, 1, 1, S]`` bool, True at padded keys, or None when nothing is padded.
    ``count``: the rows averaged over (real query rows times heads). ``grad_enabled``: whether grad mode
    was on at the call (under no_grad no gradient is taken).
    """

    @staticmethod
    def forward(ctx, xs: Tensor, xt: Tensor, key_invalid: Tensor | None, count: int, grad_enabled: bool):
        need_s, need_t = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        # x x^T / sqrt(d) as y y^T with y = x d^(-1/4): the scaling runs over [S, d], not over [S, S]
        ys, yt = xs * xs.shape[-1] ** -0.25, xt * xt.shape[-1] ** -0.25

        def log_relation(y: Tensor) -> Tensor:
            scores = y @ y.transpose(-1, -2)
            if key_invalid is not None:
                scores.masked_fill_(key_invalid, torch.finfo(scores.dtype).min)
            return torch.log_softmax(scores, dim=-1)

        log_r_s, log_r_t = log_relation(ys), log_relation(yt)
        r_t = log_r_t.exp()
        diff = log_r_t.sub_(log_r_s)  # log R_t - log R_s; 0 at padded keys (both logs are the dtype's minimum)
        weighted = diff * r_t if need_t else diff.mul_(r_t)
        per_row = weighted.sum(dim=-1, keepdim=True)
        total = per_row.sum()
        denominator = max(count, 1)
        grad_s = grad_t = None

        def through_scores(g: Tensor, y: Tensor, x: Tensor) -> Tensor:  # dL/dscores -> dL/dx (scores = y y^T)
            grad = g @ y
            grad.add_(g.transpose(-1, -2) @ y)
            return grad.mul_(x.shape[-1] ** -0.25 / denominator)

        if need_t:  # d KL_row / d score_t = R_t (log R_t - log R_s - KL_row)
            grad_t = through_scores(diff.sub_(per_row).mul_(r_t), yt, xt)
        del diff, weighted
        if need_s:  # d KL_row / d score_s = R_s - R_t
            grad_s = through_scores(log_r_s.exp_().sub_(r_t), ys, xs)
        ctx.save_for_backward(grad_s, grad_t)  # freed after the backward (unless the graph is retained)
        return total / denominator

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_s, grad_t = ctx.saved_tensors
        return (None if grad_s is None else grad_s * grad_output,
                None if grad_t is None else grad_t * grad_output, None, None, None)


# ---------------------------------------------------------------------------------------------
# ELECTRA discriminator terms (one logit per token: "this token was replaced")


@_full_precision
def rtd_loss(student_logits: Tensor, replaced_labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Replaced-token-detection loss: binary cross-entropy with logits, mean over real tokens.

    Args:
        student_logits: ``[B, S]`` with ``mask`` ``[B, S]``, or gathered ``[N]``.
        replaced_labels: same shape, 1 where the generator replaced the token.

    Returns:
        scalar, nats per token.
    """
    if student_logits.shape != replaced_labels.shape:
        raise ValueError(
            f"rtd_loss: logits {tuple(student_logits.shape)} do not match labels {tuple(replaced_labels.shape)}"
        )
    z = _kept_rows(student_logits, mask, 0)
    y = _kept_rows(replaced_labels, mask, 0).to(z.dtype)
    return F.binary_cross_entropy_with_logits(z, y, reduction="sum") / max(z.numel(), 1)


@_full_precision
def rtd_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """Binary ``KL(q_t || q_s)`` per token with ``q = sigmoid(z / T)``, mean over real tokens, times ``T^2``.

    Args:
        student_logits, teacher_logits: ``[B, S]`` with ``mask`` ``[B, S]``, or gathered ``[N]``.
        temperature: ``T > 0``.

    Returns:
        scalar, nats per token times ``T^2``.
    """
    t = check_temperature(temperature)
    s, te = _kept_pair(student_logits, teacher_logits, mask, 0, "rtd_kl")
    a, b = s / t, te / t
    # log q and log(1 - q) as logsigmoid(+-z): finite for any finite logit.
    per_token = torch.sigmoid(b) * (F.logsigmoid(b) - F.logsigmoid(a)) + torch.sigmoid(-b) * (
        F.logsigmoid(-b) - F.logsigmoid(-a)
    )
    return _mean(per_token) * t**2


# ---------------------------------------------------------------------------------------------
# MiniLMv2 multi-head self-attention relations


def _relation_heads_error(relation_heads, widths: dict[str, int]) -> str | None:
    """Why ``relation_heads`` cannot split every width, or None when it can."""
    if isinstance(relation_heads, bool) or not isinstance(relation_heads, int) or relation_heads < 1:
        return f"relation_heads={relation_heads!r} must be a whole number >= 1"
    bad = {side: w for side, w in widths.items() if w % relation_heads}
    if not bad:
        return None
    common = math.gcd(*widths.values())
    fits = [n for n in range(1, common + 1) if common % n == 0]
    nearest = sorted(sorted(fits, key=lambda n: abs(n - relation_heads))[:4])
    shown = ", ".join(f"{side} width {w}" for side, w in bad.items())
    return (f"relation_heads={relation_heads} does not divide the {shown}: choose a count that divides "
            f"{' and '.join(str(w) for w in widths.values())}, e.g. {', '.join(map(str, nearest))}")


def check_relation_heads(relation_heads: int, **widths: int) -> None:
    """Raise ``ValueError`` unless ``relation_heads`` divides every width, e.g. ``student=384, teacher=768``.

    For config checks, so a bad count fails before any weight is loaded.
    """
    error = _relation_heads_error(relation_heads, widths)
    if error:
        raise ValueError(error)


@_full_precision
def relation_kl(student_x: Tensor, teacher_x: Tensor, mask: Tensor | None, relation_heads: int) -> Tensor:
    """MiniLMv2's self-attention relation loss for one kind of vector (queries, keys or values).

    Each side's ``[B, S, width]`` vectors (all attention heads concatenated) are split into the
    same ``relation_heads`` heads of its own size ``d = width / relation_heads``, so teacher and
    student need no common attention-head count and no projection. Per head ``r`` the relation
    is ``R_r = softmax(x_r x_r^T / sqrt(d))`` over real keys; the loss is ``KL(R_t || R_s)`` per
    real query row, averaged over every real query row of the batch and over the heads (each
    real token of the batch weighs the same, as every mask-averaged loss here).

    Computed in float32 (float64 stays float64) with autocast off, so fp16/bf16 inputs give
    finite values: scores are formed after the cast and padded keys are filled with the
    float32 minimum, never ``-inf`` or an fp16-overflowing constant.

    Args:
        student_x: ``[B, S, W_s]`` one student layer's query, key or value vectors.
        teacher_x: ``[B, S, W_t]`` the same kind of vectors from one teacher layer.
        mask: ``[B, S]`` attention mask (nonzero = real token), or None for all real.
        relation_heads: heads to split both widths into; must divide ``W_s`` and ``W_t``.

    Returns:
        scalar, nats per (query row, relation head); 0 for a batch with no real token.
    """
    if student_x.dim() != 3 or teacher_x.dim() != 3 or student_x.shape[:2] != teacher_x.shape[:2]:
        raise ValueError(
            "relation_kl: expected [batch, seq, width] vectors with equal batch and seq, got "
            f"{tuple(student_x.shape)} and {tuple(teacher_x.shape)}"
        )
    error = _relation_heads_error(relation_heads, {"student": student_x.shape[-1], "teacher": teacher_x.shape[-1]})
    if error:
        raise ValueError(f"relation_kl: {error}")

    def split_heads(x: Tensor) -> Tensor:  # [B, S, W] -> [B, relation_heads, S, W / relation_heads], widened
        b, s, w = x.shape
        return _wide(x).reshape(b, s, relation_heads, w // relation_heads).transpose(1, 2)

    # The value relation of MiniLM is the same computation on pre-split heads: one implementation of the
    # masking, the float32 scores and the KL serves both.
    return value_relation_kl(split_heads(student_x), split_heads(teacher_x), mask)


__all__ += ["relation_kl", "check_relation_heads"]


# ---------------------------------------------------------------------------------------------
# sentence embeddings: token states pooled as a sentence-transformers pipeline pools them

SENTENCE_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")


@_full_precision
def pool_sentence(hidden: Tensor, mask: Tensor, modes: tuple[str, ...] = ("mean",), normalize: bool = False) -> Tensor:
    """The sentence embedding sentence-transformers' Pooling (and Normalize) module makes of token states.

    Args:
        hidden: ``[B, S, H]`` token states; ``mask`` ``[B, S]`` (1 = real token). What sits in padding
            never counts (it is replaced, not multiplied, so inf/NaN there cannot leak in).
        modes: pooled vectors, concatenated in this order: ``cls`` (the first real token), ``max``,
            ``mean``, ``mean_sqrt_len_tokens`` (sum / sqrt(length)), ``lasttoken`` (the last real token).
        normalize: divide each embedding by its L2 norm (a Normalize module after the Pooling).

    Returns:
        ``[B, H * len(modes)]``, float32 (float64 for float64 input).
    """
    if hidden.dim() != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"pool_sentence: expected hidden [B, S, H] and mask [B, S], got {tuple(hidden.shape)} "
                         f"and {tuple(mask.shape)}")
    h, keep = _wide(hidden), mask.to(device=hidden.device, dtype=torch.bool)
    rows = torch.arange(h.shape[0], device=h.device)
    lengths = keep.sum(1, keepdim=True).to(h.dtype).clamp(min=1e-9)
    total = torch.where(keep[..., None], h, 0).sum(1)
    pooled = []
    for mode in modes:
        if mode == "cls":
            pooled.append(h[rows, keep.int().argmax(1)])
        elif mode == "lasttoken":
            pooled.append(h[rows, h.shape[1] - 1 - keep.flip(1).int().argmax(1)])
        elif mode == "max":
            pooled.append(torch.where(keep[..., None], h, float("-inf")).max(1).values)
        elif mode == "mean":
            pooled.append(total / lengths)
        elif mode == "mean_sqrt_len_tokens":
            pooled.append(total / lengths.sqrt())
        else:
            raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(SENTENCE_POOLING_MODES)}")
    out = torch.cat(pooled, dim=-1)
    return F.normalize(out, p=2, dim=-1) if normalize else out


@_full_precision
def sentence_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor, modes: tuple[str, ...] = ("mean",),
                 normalize: bool = False) -> Tensor:
    """MSE between the two models' pooled sentence embeddings (sentence-transformers' ``MSELoss``, the
    objective of Reimers & Gurevych 2020 for distilling embedding models).

    Args:
        student_hidden, teacher_hidden: ``[B, S, H]`` last hidden states (same ``H``: project first);
            ``mask`` ``[B, S]``; ``modes`` and ``normalize`` as :func:`pool_sentence`.

    Returns:
        scalar: the mean over sentences and embedding features of the squared difference.
    """
    _check_same_shape(student_hidden, teacher_hidden, "sentence_mse")
    s, t = pool_sentence(student_hidden, mask, modes, normalize), pool_sentence(teacher_hidden, mask, modes, normalize)
    return _mean((s - t) ** 2)


@_full_precision
def sentence_cosine(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor, modes: tuple[str, ...] = ("mean",),
                    normalize: bool = False) -> Tensor:
    """``mean over sentences of 1 - cos(e_s, e_t)`` between pooled sentence embeddings (arguments as
    :func:`sentence_mse`; normalising does not change a cosine). Scalar in ``[0, 2]``."""
    _check_same_shape(student_hidden, teacher_hidden, "sentence_cosine")
    s, t = pool_sentence(student_hidden, mask, modes), pool_sentence(teacher_hidden, mask, modes)
    return _mean(1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8))


__all__ += ["pool_sentence", "sentence_mse", "sentence_cosine", "SENTENCE_POOLING_MODES"]
