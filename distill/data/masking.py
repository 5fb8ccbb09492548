"""Masked-LM targets, DistilBERT's way: rare tokens favoured, redone for every batch.

Pure functions. The training loop owns the ``torch.Generator`` and calls
:func:`mask_tokens` once per batch; the weights come once from the corpus' token
counts (:func:`distill.data.corpus.token_counts`) through :func:`masking_weights`.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from distill.common.errors import UsageError

IGNORE_INDEX = -100  # label of positions that are not prediction targets (torch's cross_entropy default)


def masking_weights(counts, special_ids: Iterable[int], smoothing: float = 0.7) -> torch.Tensor:
    """Relative chance of each vocabulary id to become a target: ``max(count, 1) ** -smoothing``.

    ``counts``: int array or tensor ``[vocab]`` of corpus token counts. Rare tokens get
    larger weights (DistilBERT's smoothing 0.7); ``special_ids`` get weight 0 and are
    never chosen. Returns float32 ``[vocab]`` (not normalised: only ratios matter).
    """
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise UsageError(
            f"token counts must be a non-empty 1-D array over the vocabulary, got shape {tuple(counts.shape)}"
        )
    if smoothing < 0:
        raise UsageError(f"masking smoothing {smoothing} is negative: use 0 (uniform) to 1; DistilBERT used 0.7")
    weights = counts.clamp(min=1.0).pow(-float(smoothing))
    for i in special_ids:
        if i is None:
            continue
        if not 0 <= int(i) < weights.numel():
            raise UsageError(f"special token id {i} is outside the vocabulary of {weights.numel()} ids")
        weights[int(i)] = 0.0
    return weights.float()


def num_targets(num_maskable: int, mlm_probability: float) -> int:
    """``round(mlm_probability * num_maskable)``, at least 1 when anything is maskable.

    At least one target keeps the masked-LM loss defined on tiny batches (a mean over
    zero targets is NaN).
    """
    if num_maskable <= 0:
        return 0
    return min(num_maskable, max(1, math.floor(mlm_probability * num_maskable + 0.5)))


def _check_fractions(mlm_probability: float, mask_frac: float, random_frac: float) -> None:
    if not 0.0 < mlm_probability <= 1.0:
        raise UsageError(f"mlm_probability {mlm_probability} must lie in (0, 1]; DistilBERT used 0.15")
    if mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1.0 + 1e-9:
        raise UsageError(
            f"mask_frac {mask_frac} and random_frac {random_frac} must be >= 0 and sum to at most 1 "
            "(the rest keep their token); DistilBERT used 0.8 and 0.1"
        )


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    weights: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    mlm_probability: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose masked-LM targets for one batch and corrupt them.

    ``input_ids``, ``attention_mask``: ``[B, S]``. ``weights``: ``[>= vocab]`` from
    :func:`masking_weights` (0 for special ids). A position is maskable when it is real
    (mask 1), its token has weight > 0 and it is not ``mask_id``; so padding, [CLS],
    [SEP], [PAD] and [MASK] are never chosen. Over the whole batch,
    :func:`num_targets` positions are drawn without replacement with chance
    proportional to ``weights[token]``. Each target independently becomes ``mask_id``
    (``mask_frac``), a random non-special id below ``vocab_size`` (``random_frac``),
    or stays as it was (the rest).

    All randomness comes from ``generator`` (CPU or on the batch's device), so the
    result is a function of its state. Returns ``(masked_input_ids, labels)``, both
    ``[B, S]`` long; ``labels`` holds the original id at targets and -100 elsewhere.
    """
    _check_fractions(mlm_probability, mask_frac, random_frac)
    if input_ids.shape != attention_mask.shape:
        raise UsageError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ in shape"
        )
    device = input_ids.device
    gdev = generator.device
    ids = input_ids.long()
    weights = weights.to(device=device, dtype=torch.float32)
    if ids.numel() and int(ids.max()) >= weights.numel():
        raise UsageError(f"a token id {int(ids.max())} is outside the masking weights' vocabulary of {weights.numel()}")

    token_weight = weights[ids] * attention_mask.to(device).bool() * (ids != mask_id)
    flat_w = token_weight.flatten()
    maskable = int((flat_w > 0).sum())
    k = num_targets(maskable, mlm_probability)

    masked = ids.clone(memory_format=torch.contiguous_format)
    labels = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long, device=device)
    if k == 0:
        return masked, labels

    # Weighted sampling without replacement as an exponential race (Efraimidis-Spirakis):
    # the k largest log(u)/w are a draw of k positions, chance proportional to w, no
    # replacement. Weight-0 positions score -inf and are never among the k (k <= maskable).
    u = torch.rand(flat_w.shape, generator=generator, device=gdev, dtype=torch.float64).to(device)
    keys = torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)) / flat_w.double()
    # sorted positions: topk(sorted=False) orders its result differently on CPU and CUDA, and
    # the 80/10/10 draws below are assigned in this order
    targets = torch.topk(keys, k, sorted=False).indices.sort().values

    flat_masked = masked.view(-1)
    labels.view(-1)[targets] = flat_masked[targets]

    action = torch.rand(k, generator=generator, device=gdev).to(device)
    to_mask = targets[action < mask_frac]
    to_random = targets[(action >= mask_frac) & (action < mask_frac + random_frac)]
    flat_masked[to_mask] = mask_id
    if to_random.numel():
        candidates = torch.nonzero(weights[:vocab_size] > 0).flatten()
        candidates = candidates[candidates != mask_id]
        if candidates.numel() == 0:
            raise UsageError("no non-special token id is left to draw random replacements from")
        pick = torch.randint(candidates.numel(), (to_random.numel(),), generator=generator, device=gdev).to(device)
        flat_masked[to_random] = candidates[pick]
    return masked, labels
