"""GLUE metrics with scikit-learn and scipy, under GLUE's key names.

Values are fractions (0.873), not percentages; the report multiplies by 100.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def _correlation(fn, predictions, references) -> float:
    with warnings.catch_warnings():
        # A constant prediction has no correlation; scipy warns and returns nan. We report 0,
        # as sklearn's Matthews coefficient does for the same case, so JSON stays valid and
        # the GLUE average stays defined.
        warnings.simplefilter("ignore")
        value = float(fn(predictions, references)[0])
    return 0.0 if math.isnan(value) else value


METRICS = {
    "accuracy": lambda p, r: float(skm.accuracy_score(r, p)),
    # GLUE's F1 (MRPC, QQP) is the F1 of the positive class, label id 1.
    "f1": lambda p, r: float(skm.f1_score(r, p, pos_label=1, average="binary")),
    "macro_f1": lambda p, r: float(skm.f1_score(r, p, average="macro")),
    "matthews_correlation": lambda p, r: float(skm.matthews_corrcoef(r, p)),
    "pearson": lambda p, r: _correlation(stats.pearsonr, p, r),
    "spearmanr": lambda p, r: _correlation(stats.spearmanr, p, r),
}


def compute_metrics(task, predictions, references) -> dict[str, float]:
    """The task's metrics on one evaluation split.

    task: a :class:`glue_eval.tasks.Task` (``get_task("mrpc")``); this module does not
        resolve names, so the task registry can import :data:`METRICS` without a circle.
    predictions: label ids ``[N]``, or logits ``[N, classes]`` (argmax is taken);
        for regression, scores ``[N]`` or ``[N, 1]``.
    references: label ids ``[N]`` (scores for regression).
    Returns e.g. ``{"f1": 0.88, "accuracy": 0.84}``. For MNLI call it once per dev
    split: matched and mismatched are separate results, never pooled.
    """
    if isinstance(task, str):
        raise TypeError(f"compute_metrics takes a Task, not the name {task!r}: pass glue_eval.tasks.get_task({task!r})")
    predictions = np.asarray(predictions)
    references = np.asarray(references)
    if task.is_regression:
        predictions = predictions.reshape(len(predictions), -1)[:, 0].astype(np.float64)
        references = references.astype(np.float64)
    elif predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return {name: METRICS[name](predictions, references) for name in task.metrics}


def task_score(metrics: dict[str, float]) -> float:
    """One number per task: the mean of its metrics (GLUE counts two-metric tasks by their mean)."""
    return float(np.mean(list(metrics.values())))
