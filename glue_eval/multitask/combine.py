"""The weighted sum of the tasks' losses over a meta-batch (one batch of every task), and one task's soft and
hard distillation terms together."""

from __future__ import annotations

import torch

from distill.models.loading import Features


def soft_and_hard(run, student: Features, teacher, rows: dict) -> tuple:
    """One task's distillation loss: ``run.soft`` against ``teacher()`` (called only when there are soft terms)
    plus ``run.hard`` on the gold labels of ``rows``; (total, unweighted terms)."""
    total, found = run.soft(student, teacher(), rows) if run.soft is not None else (None, {})
    if run.hard is not None:
        value, parts = run.hard(student, Features(), rows)
        total = value if total is None else total + value
        found = {**found, **parts}
    return total, found


def weighted_sum(losses: dict, weights: dict) -> torch.Tensor:
    """``sum_k weights[k] * losses[k]`` over the tasks of ``losses`` (task -> scalar tensor).

    A task of weight 0 is left out rather than multiplied by 0, so one-hot weights give exactly that task's loss
    (and gradient): a meta-batch with one-hot weights is one per-task step. Tasks absent from ``weights`` weigh 1.
    """
    terms = [(float(weights.get(name, 1.0)), loss) for name, loss in losses.items()]
    terms = [(w, loss) for w, loss in terms if w != 0.0]
    if not terms:
        raise ValueError(f"every task of the meta-batch ({', '.join(losses)}) has weight 0: nothing to learn")
    total = terms[0][1] if terms[0][0] == 1.0 else terms[0][0] * terms[0][1]
    for w, loss in terms[1:]:
        total = total + (loss if w == 1.0 else w * loss)
    return total
