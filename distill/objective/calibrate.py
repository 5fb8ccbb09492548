"""The weighting aid: how much each loss term pulls on the student, and weights that balance the pulls.

``distill-train --calibrate N`` runs N batches without updating the student. For every
active term ``k`` and batch it measures the term's unweighted value ``t_k`` and the
L2 norm ``g_k = ||d t_k / d theta||`` of its own gradient over the student's trainable
parameters ``theta`` (one ``torch.autograd.grad`` per term on one shared forward, so
the terms' gradients are never mixed). Averaged over the batches (mean of per-batch
values and per-batch norms: the size of one step's pull), they give each term's

- value share ``w_k t_k / sum_j w_j t_j`` (what the logged loss is made of), and
- gradient share ``w_k g_k / sum_j w_j g_j`` (what the update is made of),

and the weights that would give every term the gradient share its configured weight
asks for, ``w_k / sum_j w_j`` (equal shares for equal weights, as in the default
recipe): ``w'_k = (w_k / g_k) * sum_j w_j g_j / sum_j w_j``. The factor keeps
``sum_k w'_k g_k`` equal to the configured recipe's, so the learning rate and the
gradient clip keep the scale they were chosen for. Norms of a sum are not sums of
norms: equal shares balance each term's pull, not the direction of the total.

Nothing here knows the training loop: :func:`calibrate` takes a callable that maps a
batch to attached term values, the parameters, and the batches.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from distill.common.errors import UsageError
from distill.common.io import atomic_write_json

__all__ = ["Calibration", "calibrate", "objective_terms", "run_calibration", "term_gradient_norms", "CALIBRATION_FILE"]

CALIBRATION_FILE = "calibration.json"


def objective_terms(objective: nn.Module, student, teacher, batch: Mapping) -> dict[str, Tensor]:
    """Each active term of ``objective`` on already-extracted features, unweighted and attached to the graph.

    The objective's forward returns detached terms (they are for logs); evaluating it once per
    term with that term alone at weight 1 gives each term's own graph from one shared forward.
    """
    weights = dict(objective.weights)
    values: dict[str, Tensor] = {}
    try:
        for name in weights:
            objective.weights = {name: 1.0}
            values[name], _ = objective(student, teacher, batch)
    finally:
        objective.weights = weights
    return values


def term_gradient_norms(terms: Mapping[str, Tensor], params: Sequence[Tensor]) -> dict[str, float]:
    """``{name: ||d term / d params||_2}``, the norm over all ``params`` together (as gradient clipping takes it).

    One ``torch.autograd.grad`` per term, keeping the graph for the next; nothing is
    accumulated into ``.grad``. A parameter a term does not reach contributes 0.
    """
    names = list(terms)
    norms: dict[str, float] = {}
    for i, name in enumerate(names):
        value = terms[name]
        if not value.requires_grad:  # e.g. a batch with no real token: the term is a constant 0
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(value, list(params), retain_graph=i < len(names) - 1, allow_unused=True)
        squares = [g.detach().double().pow(2).sum() for g in grads if g is not None]
        norms[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return norms


@dataclass(frozen=True)
class Calibration:
    """Per-term means over the calibration batches, and what they imply for the weights.

    weights: the configured weights (term -> w_k > 0).
    values: mean unweighted term value per batch (the term's own units).
    grad_norms: mean per-batch norm of the term's own gradient on the student's parameters.
    batches: how many batches were measured.
    """

    weights: dict[str, float]
    values: dict[str, float]
    grad_norms: dict[str, float]
    batches: int

    def value_shares(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """``w_k t_k / sum_j w_j t_j`` under ``weights`` (default: the configured ones)."""
        return _shares(weights or self.weights, self.values)

    def grad_shares(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """``w_k g_k / sum_j w_j g_j`` under ``weights`` (default: the configured ones)."""
        return _shares(weights or self.weights, self.grad_norms)

    def target_shares(self) -> dict[str, float]:
        """The gradient share each configured weight asks for: ``w_k / sum_j w_j``."""
        total = sum(self.weights.values())
        return {k: w / total for k, w in self.weights.items()}

    def unreachable(self) -> list[str]:
        """Terms whose gradient on the student is 0: no weight can give them a share."""
        return [k for k, g in self.grad_norms.items() if not g > 0]

    def suggested_weights(self) -> dict[str, float]:
        """Weights whose gradient shares equal :meth:`target_shares`, at the configured total pull.

        Terms with no gradient keep their configured weight (and get no share whatever it is).
        """
        reachable = {k: w for k, w in self.weights.items() if self.grad_norms[k] > 0}
        if not reachable:
            return dict(self.weights)
        pull = sum(w * self.grad_norms[k] for k, w in reachable.items()) / sum(reachable.values())
        return {k: (w / self.grad_norms[k] * pull if k in reachable else w) for k, w in self.weights.items()}

    def paste_line(self) -> str:
        """The suggested weights as one JSON object (4 significant digits) to paste into ``weights``."""
        return json.dumps({k: float(f"{w:.4g}") for k, w in self.suggested_weights().items()})

    def table(self) -> str:
        """A plain-text table: one row per term."""
        value_shares, grad_shares, suggested = self.value_shares(), self.grad_shares(), self.suggested_weights()
        head = ("term", "weight", "value", "value share", "grad norm", "grad share", "target", "suggested")
        rows = [head]
        for k in self.weights:
            rows.append((k, f"{self.weights[k]:g}", f"{self.values[k]:.4g}", f"{100 * value_shares[k]:.1f}%",
                         f"{self.grad_norms[k]:.4g}", f"{100 * grad_shares[k]:.1f}%",
                         f"{100 * self.target_shares()[k]:.1f}%", f"{suggested[k]:.4g}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        value_shares, grad_shares, suggested = self.value_shares(), self.grad_shares(), self.suggested_weights()
        return {
            "batches": self.batches,
            "gradient_on": "the student's trainable parameters (not the objective's width projections)",
            "share": "weighted gradient norm w_k * ||grad t_k|| over the sum of all terms'",
            "weights": dict(self.weights),
            "suggested_weights": json.loads(self.paste_line()),
            "unreachable": self.unreachable(),
            "terms": {k: {"weight": self.weights[k], "value": self.values[k], "value_share": value_shares[k],
                          "grad_norm": self.grad_norms[k], "grad_share": grad_shares[k],
                          "target_share": self.target_shares()[k], "suggested_weight": suggested[k]}
                      for k in self.weights},
        }

    def write(self, path) -> None:
        atomic_write_json(path, self.to_dict())


def _shares(weights: Mapping[str, float], amounts: Mapping[str, float]) -> dict[str, float]:
    weighted = {k: weights[k] * amounts[k] for k in weights}
    total = sum(weighted.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in weighted.items()}


def calibrate(
    term_values: Callable[[Mapping], Mapping[str, Tensor]],
    params: Iterable[Tensor],
    batches: Iterable[Mapping],
    weights: Mapping[str, float],
) -> Calibration:
    """Measure each term on ``batches`` without changing anything that ``params`` hold.

    Args:
        term_values: batch -> ``{term: scalar}`` unweighted and attached to the graph of the
            forward that produced them (e.g. :func:`objective_terms` after the student's forward).
        params: the parameters whose gradient norm counts (the student's trainable ones).
        batches: the batches to measure on (their count is the calibration's N).
        weights: the configured weight of every term ``term_values`` returns.

    Returns:
        a :class:`Calibration`. Raises :class:`UsageError` naming a term whose value or
        gradient is not finite, and when there is no batch.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UsageError("calibration needs trainable student parameters, and the student has none")
    sums_v: dict[str, float] = {}
    sums_g: dict[str, float] = {}
    n = 0
    for batch in batches:
        terms = term_values(batch)
        missing = sorted(set(weights) - set(terms))
        if missing:
            raise UsageError(f"calibration: the step returned no value for {', '.join(missing)}")
        norms = term_gradient_norms({k: terms[k] for k in weights}, params)
        for k in weights:
            value = float(terms[k].detach())
            if not (math.isfinite(value) and math.isfinite(norms[k])):
                raise UsageError(f"calibration: term {k!r} is {value} with gradient norm {norms[k]} on batch {n + 1}: "
                                 "check the data and the recipe before choosing weights")
            sums_v[k] = sums_v.get(k, 0.0) + value
            sums_g[k] = sums_g.get(k, 0.0) + norms[k]
        n += 1
    if n == 0:
        raise UsageError("calibration got no batch: give --calibrate N with N >= 1")
    return Calibration(weights={k: float(w) for k, w in weights.items()},
                       values={k: sums_v[k] / n for k in weights}, grad_norms={k: sums_g[k] / n for k in weights},
                       batches=n)


def run_calibration(step, params: Iterable[Tensor], batches: Iterable[Mapping], autocast, out) -> Calibration:
    """``distill-train --calibrate``: measure, print the table and the weights line, write ``out/calibration.json``.

    Args:
        step: has ``objective`` (its ``weights`` are the active terms) and ``term_values(batch)``
            (the run's forward, returning attached unweighted terms).
        params: the student's parameters.
        batches: the batches to measure on.
        autocast: a callable returning the run's autocast context, so the measured forward is
            the one training would run.
        out: the output folder; only ``calibration.json`` is written there (atomically).
    """
    import sys
    from pathlib import Path

    def term_values(batch):
        with autocast():
            return step.term_values(batch)

    result = calibrate(term_values, params, batches, dict(step.objective.weights))
    path = Path(out) / CALIBRATION_FILE
    result.write(path)
    print(f"calibration over {result.batches} batch(es); the student was not updated. Shares: each term's "
          "weighted value and weighted gradient norm over the sum of all terms'", file=sys.stderr)
    print(result.table())
    if result.unreachable():
        print(f"note: {', '.join(result.unreachable())} has no gradient on the student: no weight gives it a share",
              file=sys.stderr)
    print("weights giving each term the gradient share its configured weight asks for (paste into weights):",
          file=sys.stderr)
    print(result.paste_line())
    print(f"wrote {path}", file=sys.stderr)
    return result
