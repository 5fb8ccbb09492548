"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"), on one process and under DDP.

For every task i, in a random order of the other tasks j: where ``g_i · g_j < 0`` (the two conflict), project
the running ``g_i`` off the ORIGINAL ``g_j``: ``g_i <- g_i - (g_i · g_j) / |g_j|^2 g_j``. The update is the
SUM of the projected gradients (the paper's Algorithm 1; with no conflict it is the plain summed gradient).
Only the shared parameters (the encoder) are projected: a head's gradient comes from its own task alone.

Under DDP each rank holds the gradients of its own shard of every task's batch. PCGrad is not linear, so
projecting each rank's gradients and then averaging is PCGrad of nobody's batch: a rank's conflicts are those
of a small shard, and averaging projected vectors is not projecting the average. So here every task's gradient
is all-reduced first (one collective over the stacked ``[K, P]`` tensor), then every rank projects the same
averaged gradients in the same seeded order and arrives at the same update, exactly the one-process PCGrad of
the global batch; no further all-reduce is needed. It costs K gradient-sized all-reduces instead of one.
"""

from __future__ import annotations

import torch


def projection_orders(num_tasks: int, generator: torch.Generator) -> list[list[int]]:
    """For each task i, the other tasks in a uniformly random order (one ``randperm`` per task, drawn in task
    order from ``generator``: ranks seeded alike draw alike)."""
    orders = []
    for i in range(num_tasks):
        perm = torch.randperm(num_tasks, generator=generator).tolist()
        orders.append([j for j in perm if j != i])
    return orders


def project_conflicts(grads: torch.Tensor, orders: list[list[int]], tally: dict | None = None) -> torch.Tensor:
    """grads: ``[K, P]`` one flat gradient per task. Returns ``[K, P]``, each row projected off the original
    rows it conflicts with, in ``orders[i]`` (from :func:`projection_orders`). ``tally``: ``pairs`` (each (i, j)
    looked at) and ``conflicts`` (each projection made) are added to it, so a run can say how often PCGrad acted."""
    out = grads.clone()
    squares = (grads * grads).sum(dim=1)
    conflicts = 0
    for i, order in enumerate(orders):
        g = out[i]
        for j in order:
            dot = torch.dot(g, grads[j])
            if dot < 0:  # a conflict; |g_j| > 0 here, or the dot would be 0
                g -= (dot / squares[j]) * grads[j]
                conflicts += 1
    if tally is not None:
        tally["pairs"] = tally.get("pairs", 0) + sum(len(o) for o in orders)
        tally["conflicts"] = tally.get("conflicts", 0) + conflicts
    return out


def pcgrad(grads: torch.Tensor, generator: torch.Generator, tally: dict | None = None) -> torch.Tensor:
    """The PCGrad update ``[P]`` of ``grads`` ``[K, P]``: projected per task, then summed (``tally``: as
    :func:`project_conflicts`)."""
    return project_conflicts(grads, projection_orders(grads.shape[0], generator), tally).sum(dim=0)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over the ranks in place (a no-op without an initialised process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def mean_over_ranks(value: float, device="cpu") -> float:
    """``value`` averaged over the ranks (itself on one process): what every rank's hybrid schedule observes, so
    all of them switch on the same step (each rank's own loss is its shard's, and they differ)."""
    return float(all_reduce_mean_(torch.tensor([float(value)], dtype=torch.float64, device=device)))


def distributed_pcgrad(grads: torch.Tensor, generator: torch.Generator, tally: dict | None = None) -> torch.Tensor:
    """PCGrad of the global batch: every task's gradient averaged over the ranks, then projected (see above).
    ``generator`` must be seeded alike on every rank; each rank returns the same update (and tally)."""
    return pcgrad(all_reduce_mean_(grads), generator, tally)
