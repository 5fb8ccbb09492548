"""Length groups: run a padded batch as a few shorter batches, so the model computes on less padding.

A collated batch is padded to its longest row. With rows of 32 to 128 tokens, about a third of what the
layers compute is padding. :func:`extract_in_groups` sorts the rows by length, cuts them into at most
``groups`` runs (the cut that computes the fewest padded positions, by dynamic programming over the sorted
lengths), runs :func:`distill.models.loading.extract` on each run trimmed to its own longest row, and puts the
outputs back in the batch's row order, padded with zeros to the batch's length. The losses then read one
:class:`Features` as if one forward had run: a term never counts a padded position, so the values are those of
the one forward up to float rounding (different matrix shapes sum in a different order), and gradients flow
through every group's forward.

Only right-padded batches qualify (every row's real tokens a prefix): slicing a left-padded row would move its
tokens to other absolute positions. Anything else runs as one forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loading import Features, extract


def length_groups(lengths: list[int], groups: int) -> list[list[int]]:
    """Row indices cut into at most ``groups`` runs of rows sorted by length, minimising the positions computed:
    the sum over runs of (rows in the run) x (its longest row). Runs come shortest first; empty runs are dropped."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    n, k = len(sizes), max(1, min(groups, len(sizes)))
    inf = float("inf")
    # best[g][j]: the fewest positions for the first j sorted rows in g runs; cut[g][j]: where the last run starts
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for g in range(1, k + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                cost = best[g - 1][i] + (j - i) * sizes[j - 1]
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    g = min(range(1, k + 1), key=lambda m: (best[m][n], m))  # fewest runs among the equally cheap
    runs, j = [], n
    while g > 0:
        i = cut[g][j]
        runs.append(order[i:j])
        j, g = i, g - 1
    return [run for run in reversed(runs) if run]


def right_padded(mask: torch.Tensor) -> bool:
    """True when every row's real tokens are a prefix of it (padding on the right only)."""
    lengths = mask.sum(1, keepdim=True)
    return bool(torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths))


def batch_groups(attention_mask: torch.Tensor, groups: int) -> list[tuple[list[int], torch.Tensor, int]]:
    """A batch's length groups as (row indices, the same as an index tensor, the group's longest row); empty when
    the batch runs as one forward (``groups`` <= 1, not right-padded, or every row in one group)."""
    if groups <= 1 or not right_padded(attention_mask):
        return []
    lengths = attention_mask.sum(1).tolist()
    runs = length_groups(lengths, groups)
    if len(runs) <= 1:
        return []
    return [(run, torch.tensor(run, device=attention_mask.device), max(lengths[i] for i in run)) for run in runs]


def _pad_to(t: torch.Tensor, length: int, dims: tuple[int, ...]) -> torch.Tensor:
    """``t`` zero-padded on the right of each of ``dims`` (negative) up to ``length``."""
    if not dims:
        return t
    pad = [0, 0] * max(-d for d in dims)
    for d in dims:
        pad[2 * (-d - 1) + 1] = length - t.shape[d]
    return F.pad(t, pad) if any(pad) else t


def _join(parts: list, inverse: torch.Tensor, length: int, dims: tuple[int, ...]):
    """Per-group tensors (rows in group order) -> one tensor in the batch's row order, padded to ``length``."""
    if parts[0] is None:
        return None
    joined = torch.cat([_pad_to(p, length, dims) for p in parts])
    return joined[inverse.to(joined.device)]


def merge_features(parts: list[Features], runs: list[list[int]], length: int) -> Features:
    """The groups' features as one batch's (see the module's docstring)."""
    order = torch.tensor([i for run in runs for i in run])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    first = parts[0]
    hidden = None if first.hidden_states is None else tuple(
        _join([p.hidden_states[i] for p in parts], inverse, length, (-2,)) for i in range(len(first.hidden_states)))
    attentions = None if first.attentions is None else tuple(
        _join([p.attentions[i] for p in parts], inverse, length, (-1, -2)) for i in range(len(first.attentions)))
    return Features(
        hidden_states=hidden, attentions=attentions,
        values={k: _join([p.values[k] for p in parts], inverse, length, (-2,)) for k in first.values},
        qkv={k: _join([p.qkv[k] for p in parts], inverse, length, (-2,)) for k in first.qkv},
        logits=_join([p.logits for p in parts], inverse, length, ()),
    )


def extract_in_groups(model, input_ids, attention_mask, *, groups: int = 1, token_type_ids=None, **kwargs) -> Features:
    """:func:`extract` over at most ``groups`` length groups of a right-padded batch (one forward otherwise).

    Takes what :func:`extract` takes except ``positions`` (a masked-LM head's rows are ordered by position;
    sequence-level and representation outputs only)."""
    if "positions" in kwargs:
        raise ValueError("extract_in_groups: per-position logits are ordered by position; use extract")
    found = batch_groups(attention_mask, groups)
    if not found:
        return extract(model, input_ids, attention_mask, token_type_ids=token_type_ids, **kwargs)
    parts = []
    for _, rows, cols in found:
        types = None if token_type_ids is None else token_type_ids[rows, :cols]
        parts.append(extract(model, input_ids[rows, :cols], attention_mask[rows, :cols], token_type_ids=types,
                             **kwargs))
    return merge_features(parts, [run for run, _, _ in found], attention_mask.shape[1])
