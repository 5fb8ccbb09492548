"""The pipeline's last stages: dev metrics per split and the task's score, and GLUE's submission files."""

from __future__ import annotations

import os

import numpy as np

from .metrics import compute_metrics, task_score
from .tasks import Task


def logits_of(predictions):
    """The logits of ``Trainer.predict``'s predictions (a tuple when the model returns more)."""
    return predictions[0] if isinstance(predictions, tuple) else predictions


def evaluate(trainer, task: Task, dev: dict) -> dict:
    """Metrics per dev split (fractions), the task score per split, its one number and the selection split's."""
    metrics = {}
    for split, ds in dev.items():
        out = trainer.predict(ds, metric_key_prefix=f"eval_{split}")
        metrics[split] = compute_metrics(task, logits_of(out.predictions), out.label_ids)
    scores = {split: task_score(m) for split, m in metrics.items()}
    return {
        "dev": metrics,
        "score_by_split": scores,
        # The task's one number for the GLUE average: MNLI counts m and mm by their mean.
        "score": float(np.mean(list(scores.values()))),
        "selection_split": task.selection_split,
        "selection_score": scores[task.selection_split],
    }


def write_submission(trainer, task: Task, data: dict, folder: str) -> list[str]:
    """GLUE server files: ``index<TAB>prediction`` per test row, class names as GLUE's TSVs spell them.

    With MNLI, ``data`` may also hold GLUE's diagnostic set: it is predicted with the same model into AX.tsv.
    """
    from distill.common.io import atomic_write_text

    from .tasks import DIAGNOSTIC_OF, DIAGNOSTIC_SPLIT

    written = []
    files = dict(task.test_splits)
    if DIAGNOSTIC_SPLIT in data:
        files[DIAGNOSTIC_SPLIT] = DIAGNOSTIC_OF[task.name].test_splits["test"]
    for split, filename in files.items():
        ds = data[split]
        index = ds["idx"]
        out = trainer.predict(ds.remove_columns(["idx", "label"]))
        logits = logits_of(out.predictions)
        if task.is_regression:
            preds = [f"{x:.3f}" for x in np.asarray(logits).reshape(len(ds), -1)[:, 0]]
        else:
            preds = [task.tsv_labels[i] for i in np.asarray(logits).argmax(-1)]
        lines = ["index\tprediction"] + [f"{i}\t{p}" for i, p in zip(index, preds)]
        atomic_write_text(os.path.join(folder, filename), "\n".join(lines) + "\n")
        written.append(os.path.join("submission", filename))
    return written
