"""Which task the next batch comes from, and when a hybrid run sums the tasks' losses.

Every sampler is ``p_i ∝ n_i ** a`` over the tasks' training sizes ``n_i``: proportional ``a = 1``, uniform
``a = 0``, temperature-scaled ``a = 1 / T`` (multilingual BERT, XLM, T5's mixing: T > 1 lifts small tasks), and
annealed ``a`` moving linearly from 1 at the start to ``final_exponent`` at the end (Stickland & Murray 2019,
"BERT and PALs": ``a = 1 - 0.8 (e - 1) / (E - 1)`` over epochs e = 1..E; here over the run's progress, so it
also holds for step-counted runs).
"""

from __future__ import annotations

import numpy as np

from .config import Sampling, Schedule


def exponent(sampling: Sampling, progress: float = 0.0) -> float:
    """The exponent ``a`` of ``p_i ∝ n_i ** a`` at ``progress`` in [0, 1] (the fraction of the run done)."""
    if sampling.kind == "proportional":
        return 1.0
    if sampling.kind == "uniform":
        return 0.0
    if sampling.kind == "temperature":
        return 1.0 / sampling.temperature
    progress = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - sampling.final_exponent) * progress


def task_probabilities(sizes, sampling: Sampling, progress: float = 0.0) -> np.ndarray:
    """``[K]`` float64 probabilities of the tasks of training sizes ``sizes`` (computed in log space, so a large
    task and a small exponent neither overflow nor round to one)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) == 0 or (sizes <= 0).any():
        raise ValueError(f"task sizes must be positive counts, got {sizes.tolist()}")
    logits = exponent(sampling, progress) * np.log(sizes)
    p = np.exp(logits - logits.max())
    return p / p.sum()


class TaskSampler:
    """Draws the task of each per-task batch: seeded, so a run repeats its order. ``draw(progress)`` -> index."""

    def __init__(self, sizes, sampling: Sampling, seed: int):
        self.sizes = list(sizes)
        self.sampling = sampling
        self.rng = np.random.default_rng(seed)

    def probabilities(self, progress: float = 0.0) -> np.ndarray:
        return task_probabilities(self.sizes, self.sampling, progress)

    def draw(self, progress: float = 0.0) -> int:
        return int(self.rng.choice(len(self.sizes), p=self.probabilities(progress)))


class HybridSchedule:
    """The step kinds of a run: ``"sum"`` (a meta-batch) or ``"per_task"`` (one task's batch).

    ``per_task`` and ``sum`` modes give their own kind every step. ``hybrid``: sum steps while the mean summed
    loss of each window of ``window`` sum steps keeps improving on the best so far by more than ``min_delta``;
    after ``patience`` windows without that, the run switches (for good) to per-task steps, with a sum step
    every ``sum_every`` steps against forgetting. Feed every sum step's loss to :meth:`observe`.
    """

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.switched_at: int | None = None  # the step of the switch, once it happened
        self._window: list[float] = []
        self._best = float("inf")
        self._stale = 0
        self._step = 0

    def next_kind(self) -> str:
        mode = self.schedule.mode
        if mode != "hybrid":
            return mode
        if self.switched_at is None:
            return "sum"
        since = self._step - self.switched_at
        return "sum" if since % self.schedule.sum_every == self.schedule.sum_every - 1 else "per_task"

    def observe(self, kind: str, loss: float | None = None) -> None:
        """Record the step just taken (its kind, and its summed loss if it was a sum step before the switch)."""
        self._step += 1
        if self.schedule.mode != "hybrid" or self.switched_at is not None or kind != "sum":
            return
        self._window.append(float(loss))
        if len(self._window) < self.schedule.window:
            return
        mean = sum(self._window) / len(self._window)
        self._window.clear()
        if mean < self._best - self.schedule.min_delta:
            self._best, self._stale = mean, 0
            return
        self._stale += 1
        if self._stale >= self.schedule.patience:
            self.switched_at = self._step
