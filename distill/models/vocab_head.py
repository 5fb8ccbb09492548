"""The vocabulary head, chunk by chunk: logit terms that never hold ``[N, vocab]`` logits.

A masked-LM head ends in one linear layer onto the vocabulary (30,522 outputs for BERT).
At every real token of a batch of 8 x 128 that is a ``[1024, 30522]`` float32 tensor per
model (125 MB), and the soft-target terms make several more of that size (softmaxes,
log-softmaxes, their gradients), which autograd keeps until the backward pass. Here the
decoder runs on a slice of rows at a time: for each chunk the student's and the teacher's
logits are made, the chunk's share of every logit term is computed, and its gradient with
respect to the decoder's input rows and parameters is taken at once, so the chunk's logits
are freed before the next chunk starts. The backward pass then only scales the stored
gradients. The matmuls are the ones the whole head does (no recomputation); what goes is
the memory and the passes over full-size logits (the idea of Liger-Kernel's fused linear
cross-entropy, here for soft targets and several terms at once).

A term may be chunked when its value is a mean over logit rows (``TermSpec.row_mean``): over
the whole batch it is then ``sum_c (rows counted in chunk c / rows counted) * value(chunk c)``,
exactly. The registry's own loss functions compute each chunk's value, so a new row-mean term
needs nothing here. A term that also gives its gradient (``TermSpec.logit_grad``) is not
differentiated by autograd: its value and gradient come from a few passes over the chunk, most of
them in place, and no graph is kept over its logits (``chunked(..., chunk_grad=...)``;
``python -m bench.logit_grad`` times it against autograd).

Gradients are taken in the forward pass, before the loop's backward scales the loss, so in fp16
modes ``Precision.autocast()`` says which scale it will be (:func:`gradient_scale`): the gradients
are taken at that scale and keep the range it gives them; the backward pass divides by it again.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# logits per chunk when logit_chunk_rows is 0 (auto): 2**22 float32 logits = 16 MB per tensor
AUTO_CHUNK_LOGITS = 2 ** 22
_GRADIENT_SCALE: contextvars.ContextVar[float] = contextvars.ContextVar("gradient_scale", default=1.0)


@contextlib.contextmanager
def gradient_scale(scale: float):
    """Within it, chunked heads take their gradients at ``scale``: the factor the coming backward
    multiplies the loss by (a GradScaler's scale). ``Precision.autocast()`` enters it in fp16 modes."""
    token = _GRADIENT_SCALE.set(float(scale))
    try:
        yield
    finally:
        _GRADIENT_SCALE.reset(token)


def current_gradient_scale() -> float:
    return _GRADIENT_SCALE.get()


@dataclass
class DeferredLogits:
    """A vocabulary head's output, not computed yet: its decoder's input rows and the decoder.

    hidden: ``[N, H']`` the head's transform at the gathered positions (``positions.nonzero()``
        order), attached to the model's graph.
    weight, bias: the decoder's ``[vocab, H']`` weight and ``[vocab]`` bias (or None).
    autocast: ``(device_type, dtype)`` of the autocast active when the model ran, or None:
        the decoder runs in that dtype, as it would have inside the model.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    autocast: tuple[str, torch.dtype] | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.hidden.shape[0], self.weight.shape[0]))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The decoder matmul's dtype: autocast's where it was on (autocast leaves float64 alone), else the weight's."""
        if self.autocast is None or self.weight.dtype == torch.float64:
            return self.weight.dtype
        return self.autocast[1]

    def cast(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias in :attr:`compute_dtype` (autocast's casts, done once for all chunks)."""
        dtype = self.compute_dtype
        return self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)

    def rows(self, rows: slice | None = None, cast: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """Logits of ``rows`` (all by default), from :meth:`cast`'s weights (given, or made now)."""
        weight, bias = self.cast() if cast is None else cast
        hidden = self.hidden if rows is None else self.hidden[rows]
        return F.linear(hidden.to(weight.dtype), weight, bias)

    def materialize(self) -> Tensor:
        """The whole ``[N, vocab]`` logits, attached to the graph (the unchunked path)."""
        return self.rows()


def capture_autocast(device_type: str) -> tuple[str, torch.dtype] | None:
    """The autocast state of ``device_type`` now, for :class:`DeferredLogits`."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def chunk_rows(setting: int, n_rows: int, vocab: int, width: int) -> int:
    """Rows per chunk for ``logit_chunk_rows`` = ``setting`` (0: auto; -1: one chunk of all rows).

    Auto: chunks of about 2**22 logits, but of at least a quarter of the decoder's input ``width`` in
    rows: every chunk also reads and writes the whole ``[vocab, width]`` weight gradient, about
    ``2 * width`` floats per vocabulary entry, against roughly 8 passes over its ``rows`` logits, so
    below ``width / 4`` rows the accumulation would cost more memory traffic than the chunk's own
    work (XLM-R's 250k vocabulary would otherwise give chunks of 17 rows). Chunks are of equal size,
    none below that floor (no small last chunk)."""
    if setting < 0 or n_rows == 0:
        return max(n_rows, 1)
    if setting > 0:
        return setting
    rows = max(math.ceil(AUTO_CHUNK_LOGITS / max(vocab, 1)), math.ceil(width / 4))
    chunks = max(1, n_rows // rows)
    return math.ceil(n_rows / chunks)


ChunkLoss = Callable[[slice, Tensor], "tuple[Tensor, Tensor]"]
# (rows, logits of those rows, gradient scale) -> (value, parts, scale * d value / d logits, or None)
ChunkGrad = Callable[[slice, Tensor, float], "tuple[Tensor, Tensor, Tensor | None]"]


class _ChunkedHead(torch.autograd.Function):
    """``(total, parts)`` of ``chunk_loss`` summed over row chunks of ``head``'s logits; gradients
    taken per chunk in the forward pass (see the module docstring)."""

    @staticmethod
    def forward(ctx, chunk_loss: ChunkLoss, chunk_grad: ChunkGrad | None, head: DeferredLogits,
                rows_per_chunk: int, scale: float, hidden: Tensor, weight: Tensor, bias: Tensor | None):
        needs = ctx.needs_input_grad[5:8]
        n = hidden.shape[0]
        w_c, b_c = head.cast()  # the decoder in the matmul's dtype, once
        w_c, b_c = w_c.detach(), None if b_c is None else b_c.detach()
        # The parameters' gradients sum over chunks: accumulated in at least float32 (fp16 O2 weights),
        # in place where the matmul's dtype is already that (no [vocab, H'] temporary per chunk). The
        # first chunk's matmul writes them (no zero-filled [vocab, H'] first).
        wide = torch.promote_types(weight.dtype, torch.float32)
        # contiguous whatever hidden's strides (a chunk's rows are then one block for mm's out=); rows of a chunk
        # without a gradient stay 0
        grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs[0] else None
        grad_w = grad_b = None
        total, parts = None, None
        for start in range(0, max(n, 1), rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, n))
            h = hidden[rows].detach().to(w_c.dtype)
            if chunk_grad is not None and any(needs):  # the terms' own gradients: no graph over the logits
                value, chunk_parts, grad_z = chunk_grad(rows, F.linear(h, w_c, b_c), scale)
                grad_z = None if grad_z is None else grad_z.to(w_c.dtype)
            else:
                with torch.enable_grad():
                    logits = F.linear(h, w_c, b_c).requires_grad_(any(needs))
                    value, chunk_parts = chunk_loss(rows, logits)
                    if any(needs) and value.requires_grad:
                        (grad_z,) = torch.autograd.grad(value * scale, logits, allow_unused=True)
                    else:
                        grad_z = None
            if grad_z is not None:
                if grad_h is not None and grad_h.dtype == grad_z.dtype:
                    torch.mm(grad_z, w_c, out=grad_h[rows])  # written in place: rows are a contiguous slice
                elif grad_h is not None:
                    grad_h[rows] = (grad_z @ w_c).to(grad_h.dtype)
                if needs[1]:
                    if grad_w is None:
                        grad_w = (grad_z.t() @ h).to(wide)
                    elif grad_z.dtype == wide:
                        grad_w.addmm_(grad_z.t(), h)
                    else:  # the matmul in its (fp16/bf16) dtype, promoted as it is added: no wide temporary
                        grad_w.add_(grad_z.t() @ h)
                if needs[2]:
                    grad_b = grad_z.sum(0, dtype=wide) if grad_b is None else grad_b.add_(grad_z.sum(0, dtype=wide))
            value, chunk_parts = value.detach(), chunk_parts.detach()
            total = value if total is None else total + value
            parts = chunk_parts if parts is None else parts + chunk_parts
        if needs[1] and grad_w is None:  # no chunk had a gradient (e.g. no row counted)
            grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device)
        if needs[2] and grad_b is None:
            grad_b = torch.zeros(bias.shape, dtype=wide, device=bias.device)
        ctx.scale = scale
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_parts):
        if ctx.grads is None:
            raise RuntimeError("a chunked vocabulary head's gradients were taken once already: backpropagate "
                               "through it once per forward (or set logit_chunk_rows to -1)")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # scaled in place and handed over: no second [vocab, H'] copy
        factor = grad_total / ctx.scale
        # a factor of 1 (the usual case: gradients were taken at the scale the backward brings) costs no pass
        # over [vocab, H']; read on the CPU only, where it is no device sync
        unit = factor.device.type == "cpu" and factor.numel() == 1 and float(factor) == 1.0

        def scaled(grad):
            return grad if grad is None or unit else grad.mul_(factor)

        out_h, out_w, out_b = scaled(grad_h), scaled(grad_w), scaled(grad_b)
        out_w = None if out_w is None else out_w.to(ctx.dtypes[0])
        out_b = None if out_b is None else out_b.to(ctx.dtypes[1])
        return None, None, None, None, None, out_h, out_w, out_b


def chunked(chunk_loss: ChunkLoss, head: DeferredLogits, rows_per_chunk: int, scale: float | None = None,
            chunk_grad: ChunkGrad | None = None) -> tuple[Tensor, Tensor]:
    """Sum ``chunk_loss(rows, logits_of_those_rows)`` over row chunks of ``head``.

    ``chunk_loss`` returns ``(value, parts)``: the chunk's share of the loss (a scalar, attached to
    ``logits``) and a detached vector of per-term shares for logs. Returns ``(total, parts)``:
    ``total`` backpropagates into ``head.hidden``, ``head.weight`` and ``head.bias``, with the
    gradients of the unchunked computation; ``scale``: the factor the caller's backward will
    multiply by (a GradScaler's scale), so fp16 gradients are taken in range; None: the one
    :func:`gradient_scale` set (``Precision.autocast()`` does in fp16 modes), else 1.
    ``chunk_grad(rows, logits, scale)``, when given, returns ``(value, parts, scale * d value / d logits)``
    itself (the terms' ``logit_grad``), run without autograd; else autograd differentiates ``chunk_loss``.
    """
    scale = current_gradient_scale() if scale is None else scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"gradient scale {scale!r} must be a finite number > 0")
    if not torch.is_grad_enabled():  # no backward will come: the values alone, no gradients taken
        rows_per_chunk = max(int(rows_per_chunk), 1)
        cast = head.cast()
        total = parts = None
        for start in range(0, max(head.shape[0], 1), rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, head.shape[0]))
            value, chunk_parts = chunk_loss(rows, head.rows(rows, cast))
            total = value if total is None else total + value
            parts = chunk_parts if parts is None else parts + chunk_parts
        return total, parts
    return _ChunkedHead.apply(chunk_loss, chunk_grad, head, max(int(rows_per_chunk), 1), float(scale),
                              head.hidden, head.weight, head.bias)
