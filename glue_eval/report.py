"""One Markdown table (and a PNG) from a grid's results, next to the teacher and published numbers.

Per task: the best single run on dev ("best on dev", optimistic: chosen on the
split it reports) and the median over seeds of that run's learning rate and
batch size (the fairer number). MNLI runs are chosen on matched dev; mismatched
is reported for the same run and never used to choose.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections import defaultdict

from distill.common.errors import UsageError
from distill.common.io import atomic_write_text

from .record import read_results
from .tasks import GLUE_ORDER, GLUE_TASKS

# GLUE dev, as DESIGN.md lists them. One number per task as the sources give it (MNLI m/mm where
# given; the seed report's MRPC is F1). The GLUE score of a row is the mean of its numbers.
REFERENCES = {
    "BERT-base-uncased": {"cola": 56.3, "mnli": 84.7, "mrpc": 88.6, "qnli": 91.8, "qqp": 89.6, "rte": 69.3,
                          "sst2": 92.7, "stsb": 89.0, "wnli": 53.5},
    "DistilBERT (6L)": {"cola": 51.3, "mnli": 82.1, "mrpc": 87.5, "qnli": 89.2, "qqp": 88.5, "rte": 59.9,
                        "sst2": 91.3, "stsb": 86.9, "wnli": 56.3},
    "seed report 4L (cos)": {"cola": 28.9, "mnli": (78.1, 79.1), "mrpc": 86.3, "qnli": 85.6, "qqp": 89.3,
                             "rte": 58.5, "sst2": 88.9, "stsb": 83.5, "wnli": 56.3},
    "seed report 4L (att MSE)": {"cola": 29.6, "mnli": (78.0, 78.3), "mrpc": 86.1, "qnli": 85.1, "qqp": 89.4,
                                 "rte": 58.5, "sst2": 89.6, "stsb": 83.4, "wnli": 50.7},
}

METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "macro_f1": "macro F1", "matthews_correlation": "Matthews",
                "pearson": "Pearson", "spearmanr": "Spearman"}


def _task_info(name: str, records: list[dict]):
    """(display name, metric label) of a task, GLUE or local."""
    if name in GLUE_TASKS:
        task = GLUE_TASKS[name]
        label = "/".join(METRIC_NAMES[m] for m in task.metrics)
        return task.display, label + (" m/mm" if len(task.dev_splits) > 1 else "")
    metrics = next(iter(records[0]["dev"].values())) if records else {}
    return name, "/".join(METRIC_NAMES.get(m, m) for m in metrics)


def summarise(records: list[dict]) -> dict[str, dict]:
    """Task -> best run and the median over seeds of its (learning rate, batch size).

    Each value: ``best`` (the record), ``best_values`` and ``median_values`` (percent, in display
    order: metrics of the first dev split, then of the next), ``best_score``/``median_score``
    (percent), ``seeds`` (runs in the best run's lr x batch), ``cells`` ((lr, bs) -> [score %]).
    The median is the seed of median task score (the two middle seeds averaged when the count is even), and its
    values are that seed's metrics: a two-metric task's values are one run's, not medians taken metric by
    metric (which may pair numbers no seed had and disagree with the median score).
    """
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    out = {}
    for name, runs in by_task.items():
        best = max(runs, key=lambda r: r["selection_score"])
        key = _config(best)
        same = [r for r in runs if _config(r) == key]
        splits = list(best["dev"])
        ranked = sorted(same, key=lambda r: r["score"])
        middle = ranked[(len(ranked) - 1) // 2:len(ranked) // 2 + 1]  # one run, or the two middle ones
        median_dev = {s: {m: statistics.mean(r["dev"][s][m] for r in middle) for m in best["dev"][s]}
                      for s in splits}
        cells = defaultdict(list)
        for r in runs:
            cells[_config(r)].append(100 * r["score"])
        out[name] = {
            "best": best,
            "best_values": [100 * best["dev"][s][m] for s in splits for m in best["dev"][s]],
            "median_values": [100 * median_dev[s][m] for s in splits for m in median_dev[s]],
            "best_score": 100 * best["score"],
            "median_score": 100 * statistics.median(r["score"] for r in same),
            "seeds": len(same),
            "cells": dict(cells),
        }
    return out


def _config(record: dict):
    s = record["settings"]
    return (s["learning_rate"], s["per_device_train_batch_size"])


def _fmt(values) -> str:
    if values is None:
        return "—"
    if isinstance(values, (int, float)):
        values = [values]
    return "/".join(f"{v:.1f}" for v in values)


def _ref_score(value) -> float:
    return sum(value) / len(value) if isinstance(value, tuple) else value


def build_report(out: str, teacher_dir: str | None = None) -> tuple[str, str]:
    """Write ``OUT/report.md`` and ``OUT/report.png``; return their paths."""
    records = read_results(out)
    if not records:
        raise UsageError(f"no results in {out!r}: expected {out}/<task>/<cell>/result.json from glue-eval runs")
    student = summarise(records)
    teacher = {}
    if teacher_dir is not None:
        teacher_records = read_results(teacher_dir)
        if not teacher_records:
            raise UsageError(f"no results in --teacher_results {teacher_dir!r}: run glue-eval on the teacher first")
        teacher = summarise(teacher_records)
    text = render(out, records, student, teacher, teacher_dir)
    md_path = os.path.join(out, "report.md")
    png_path = os.path.join(out, "report.png")
    plot(student, png_path)
    atomic_write_text(md_path, text)
    return md_path, png_path


def render(out: str, records: list[dict], student: dict, teacher: dict, teacher_dir: str | None) -> str:
    models = sorted({r["settings"]["model"] for r in records})
    head = ["task", "metric", "best on dev", "median over seeds", "lr", "batch", "seed", "seeds"]
    if teacher:
        head += ["teacher best", "teacher median"]
    head += list(REFERENCES)
    rows = []
    glue_present = [t for t in GLUE_ORDER if t in student]
    local = sorted(t for t in student if t not in GLUE_TASKS)
    for name in [*GLUE_ORDER, *local]:
        s = student.get(name)
        display, metric = _task_info(name, [s["best"]] if s else [])
        row = [display, metric]
        if s:
            cfg = s["best"]["settings"]
            row += [_fmt(s["best_values"]), _fmt(s["median_values"]), f"{cfg['learning_rate']:g}",
                    str(cfg["per_device_train_batch_size"]), str(cfg["seed"]), str(s["seeds"])]
        else:
            row += ["not run", "—", "—", "—", "—", "—"]
        if teacher:
            t = teacher.get(name)
            row += [_fmt(t["best_values"]), _fmt(t["median_values"])] if t else ["—", "—"]
        row += [_fmt(ref.get(name)) for ref in REFERENCES.values()]
        rows.append(row)
    # GLUE score over the tasks the student has, for every column alike, so the columns compare.
    k = len(glue_present)
    row = [f"**GLUE score** ({k} of 9 tasks)", "mean of task scores"]
    if k:
        row += [_fmt(statistics.mean(student[t]["best_score"] for t in glue_present)),
                _fmt(statistics.mean(student[t]["median_score"] for t in glue_present)), "", "", "", ""]
        if teacher:
            have = all(t in teacher for t in glue_present)
            row += [_fmt(statistics.mean(teacher[t]["best_score"] for t in glue_present)) if have else "—",
                    _fmt(statistics.mean(teacher[t]["median_score"] for t in glue_present)) if have else "—"]
        row += [_fmt(statistics.mean(_ref_score(ref[t]) for t in glue_present)) for ref in REFERENCES.values()]
    else:
        row += ["—"] * (len(head) - 2)
    rows.insert(len(GLUE_ORDER), row)  # under the GLUE tasks, above local tasks

    lines = [
        f"# GLUE dev results: {os.path.basename(os.path.abspath(out))}",
        "",
        f"Model: {', '.join(models)}. {len(records)} finished runs.",
        "",
        "**How to read this.** *best on dev* is the single best run (learning rate, batch size, seed) "
        "chosen on the dev split it is reported on, so it is optimistic: selection and reporting use the "
        "same data. MNLI runs are chosen on matched dev; mismatched is reported for the same run and was "
        "not used to choose, so it is the honest one of the two. *median over seeds* is the run of median score "
        "among the seeds of the best run's learning rate and batch size (the two middle runs averaged for an even "
        "count); that learning rate and batch size were chosen on dev too. Scores are percentages; two-metric tasks show "
        "both (F1/acc, Pearson/Spearman, m/mm) and count their mean in the GLUE score, which is the macro "
        "average over the tasks listed in its row, for every column alike.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        "Published rows give one number per task as their sources do (MNLI m/mm where given; the seed "
        "report's MRPC is F1), and their GLUE score is the mean of those numbers: compare task by task.",
    ]
    if teacher_dir:
        lines += ["", f"Teacher results: {os.path.basename(os.path.abspath(teacher_dir))}."]
    chose_checkpoint = sorted({r["checkpoint_selection"] for r in records if r.get("checkpoint_selection")})
    if chose_checkpoint:
        lines += ["", f"Some runs also chose their checkpoint on dev (--load_best_model_at_end on "
                      f"{', '.join(chose_checkpoint)}): their dev numbers are selected twice over."]
    lines += ["", "![dev score per learning rate and batch size](report.png)", "", "## Every cell", "",
              "Median (min–max) task score over seeds, percent.", "",
              "| task | lr | batch | runs | median | min–max |", "|---|---|---|---|---|---|"]
    ordered = [t for t in GLUE_ORDER if t in student] + sorted(t for t in student if t not in GLUE_TASKS)
    for name in ordered:
        for (lr, bs), scores in sorted(student[name]["cells"].items()):
            lines.append(f"| {_task_info(name, [student[name]['best']])[0]} | {lr:g} | {bs} | {len(scores)} | "
                         f"{statistics.median(scores):.1f} | {min(scores):.1f}–{max(scores):.1f} |")
    return "\n".join(lines) + "\n"


def plot(student: dict, path: str) -> None:
    """Dev score (median over seeds, dots per seed) against learning rate, a line per batch size, per task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [t for t in GLUE_ORDER if t in student] + sorted(t for t in student if t not in GLUE_TASKS)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), constrained_layout=True)
    FigureCanvasAgg(fig)  # Agg, no pyplot: no display needed, no global backend switch
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        cells = student[name]["cells"]
        for bs in sorted({b for _, b in cells}):
            lrs = sorted(lr for lr, b in cells if b == bs)
            ax.plot(lrs, [statistics.median(cells[(lr, bs)]) for lr in lrs], marker="o", label=f"batch {bs}")
            for lr in lrs:
                ax.scatter([lr] * len(cells[(lr, bs)]), cells[(lr, bs)], s=8, alpha=0.4, color="gray")
        ax.set_xscale("log")
        display, metric = _task_info(name, [student[name]["best"]])
        ax.set_title(f"{display} ({metric})")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("dev score (%)")
        ax.legend(fontsize="small")
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".report.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
