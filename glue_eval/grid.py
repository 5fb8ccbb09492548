"""Grid runs: tasks x learning rates x batch sizes x seeds, one result file per cell, resumable.

Layout of an output folder (a single run is a grid of one cell)::

    OUT/<task>/lr5e-05_bs32_seed1/result.json   one finished cell (written last, atomically)
    OUT/results.jsonl                           every finished cell, one JSON object per line

A cell whose ``result.json`` exists is skipped, so a killed grid resumes where
it stopped; a cell killed mid-run has no result file and is run again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from distill.common.errors import UsageError
from distill.common.io import (  # temp file + os.replace: a reader never sees half a result
    read_json_object,
)

from .arguments import GlueArguments, GlueTrainingArguments
from .data import check_sources, load_diagnostic, load_splits, splits_needed
from .encode import check_model_dir, load_tokenizer, sequence_length, tokenize
from .finetune import finetune
from .record import (  # noqa: F401
    describe,
    done,
    read_results,
    task_settings,
    write_result,
    write_results_jsonl,
)
from .qa_tasks import with_eval_files
from .tasks import DIAGNOSTIC_SPLIT, Task, resolve_tasks

# The seed report's grid (lr x batch, 3 epochs). Seeds 1, 2, 3: three fixed seeds so the median is
# over the same draws in every cell and a rerun reproduces it; the seed report did not publish its own.
DEFAULT_GRID = {
    "tasks": "all",
    "learning_rate": [1e-5, 5e-5, 1e-4],
    "per_device_train_batch_size": [16, 32],
    "seed": [1, 2, 3],
    "num_train_epochs": 3,
}
AXES = ("learning_rate", "per_device_train_batch_size", "seed")


def cell_name(learning_rate: float, batch_size: int, seed: int) -> str:
    return f"lr{learning_rate:g}_bs{batch_size}_seed{seed}"


def load_grid(spec: str) -> dict:
    """``"default"`` or a JSON file: axes as lists, any other TrainingArguments field as one value."""
    if spec == "default":
        return dict(DEFAULT_GRID)
    grid = read_json_object(spec, "grid file", "give a JSON file or 'default'")
    allowed = {f.name for f in dataclasses.fields(GlueTrainingArguments)} - {"output_dir"}
    allowed |= {"tasks", "max_seq_length"}
    for key, value in grid.items():
        if key == "output_dir":
            raise UsageError(f"grid file {spec!r}: give the output folder on the command line (--output_dir)")
        if key not in allowed:
            raise UsageError(f"grid file {spec!r}: {key!r} is not a TrainingArguments field (nor 'tasks')")
        if key in AXES and not (isinstance(value, list) and value):
            raise UsageError(f"grid file {spec!r}: {key} must be a non-empty list, e.g. [1e-5, 5e-5]")
        if key in AXES:
            for item in value:
                if not axis_value_ok(key, item):
                    raise UsageError(f"grid file {spec!r}: {key} value {item!r} {AXIS_RULES[key]}")
    if "max_seq_length" in grid and not axis_value_ok("max_seq_length", grid["max_seq_length"]):
        raise UsageError(f"grid file {spec!r}: max_seq_length {grid['max_seq_length']!r} "
                         f"{AXIS_RULES['max_seq_length']}")
    return grid


AXIS_RULES = {"learning_rate": "must be a number in (0, 1], e.g. 5e-5",
              "per_device_train_batch_size": "must be a whole number >= 1, e.g. 32",
              "seed": "must be a whole number >= 0, e.g. 42",
              "max_seq_length": "must be a whole number >= 8 (room for a sentence pair's special tokens and some text), e.g. 128"}


def axis_value_ok(key: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if key == "learning_rate":
        return 0 < value <= 1
    if value != int(value):
        return False
    return value >= {"per_device_train_batch_size": 1, "seed": 0, "max_seq_length": 8}[key]


def plan(grid: dict, args: GlueTrainingArguments, glue: GlueArguments):
    """(tasks, cells, base args) of a grid dict; axes missing from the grid come from the command line."""
    tasks = [with_eval_files(t, glue.eval_files) for t in resolve_tasks(glue.task or _as_spec(grid.get("tasks")))]
    fixed = {k: v for k, v in grid.items() if k not in (*AXES, "tasks", "max_seq_length")}
    try:
        base = dataclasses.replace(args, **fixed)
    except (TypeError, ValueError) as err:
        raise UsageError(f"grid settings {fixed}: {err}") from None
    if "max_seq_length" in grid:
        glue = dataclasses.replace(glue, max_seq_length=int(grid["max_seq_length"]))
    axes = [grid.get(a, [getattr(args, a)]) for a in AXES]
    cells = [(float(lr), int(bs), int(seed)) for lr in axes[0] for bs in axes[1] for seed in axes[2]]
    return tasks, cells, base, glue


def _as_spec(tasks) -> str:
    if tasks is None:
        raise UsageError("no task: pass --task NAME (or 'all'), or list 'tasks' in the grid file")
    return tasks if isinstance(tasks, str) else ",".join(tasks)


def run_grid(tasks: list[Task], cells, args: GlueTrainingArguments, glue: GlueArguments, out: str,
             announce: str | None = None) -> list[dict]:
    """Run every (task, cell) without a result yet; return all finished records of this grid.

    ``announce``: a line printed once before the first cell trains (after every input check passed).
    The grid holds ``out``'s lock while it runs: a second grid (or run) on the same folder is refused.
    """
    from distill.common.locks import output_lock

    from .trainer import STOP

    with output_lock(out, "glue-eval"), STOP:  # a signal: the cell under way checkpoints, the grid exits 75
        return _run_grid(tasks, cells, args, glue, out, announce)


def _run_grid(tasks: list[Task], cells, args: GlueTrainingArguments, glue: GlueArguments, out: str,
              announce: str | None = None) -> list[dict]:
    from .trainer import stop_after_cell

    check_model_dir(glue.model, glue.tokenizer)
    for task in tasks:
        check_sources(task, splits_needed(task, glue.predict_test), glue.data_dir)
    task_data = {t.name: task_settings(t) for t in tasks}  # file digests: once per task, not per cell
    todo = {}
    for task in tasks:
        for lr, bs, seed in cells:
            cell_args = dataclasses.replace(args, learning_rate=lr, per_device_train_batch_size=bs, seed=seed,
                                            output_dir=os.path.join(out, task.name, cell_name(lr, bs, seed)))
            if not done(cell_args.output_dir, describe(glue, cell_args, task_data[task.name])):
                todo.setdefault(task.name, []).append(cell_args)
    # Read (and so check) every task's files before training anything: a bad row in the last task
    # should stop the grid now, not after hours of work on the others.
    raw = {t.name: load_splits(t, splits_needed(t, glue.predict_test), glue.data_dir, glue.skip_bad_rows)
           for t in tasks if t.name in todo}
    for task in tasks:  # MNLI's test predictions come with GLUE's diagnostic set (AX.tsv)
        if glue.predict_test and task.name in raw:
            ax, source = load_diagnostic(task, glue.data_dir, glue.skip_bad_rows)
            if ax is not None:
                raw[task.name][DIAGNOSTIC_SPLIT] = ax
            elif source:
                print(f"note: AX.tsv skipped: {source}; give GLUE's diagnostic/diagnostic.tsv to predict it",
                      file=sys.stderr)
    tokenizer = load_tokenizer(glue.model, glue.tokenizer) if todo else None
    length, cut = sequence_length(glue, tokenizer) if todo else (glue.max_seq_length, None)
    if cut:
        print(f"note: {cut}", file=sys.stderr)
    total, n = sum(len(v) for v in todo.values()), 0
    for task in tasks:
        if task.name not in todo:
            continue
        data = tokenize(task, raw.pop(task.name), tokenizer, length, glue.doc_stride)
        for cell_args in todo[task.name]:
            n += 1
            if announce and n == 1:
                print(announce, file=sys.stderr)
            print(f"[{n}/{total}] {task.name} {os.path.basename(cell_args.output_dir)}", file=sys.stderr)
            # the settings as done() read them before the cell: fine-tuning may adjust its arguments (MNLI's
            # checkpoint selection names one split), and a resume compares against what was asked
            settings = describe(glue, cell_args, task_data[task.name])
            record = finetune(task, data, tokenizer, cell_args, glue)
            write_result(cell_args.output_dir, record, settings)
            write_results_jsonl(out)
            stop_after_cell(cell_args, cell_args.output_dir)
    write_results_jsonl(out)
    records = []
    for task in tasks:
        for lr, bs, seed in cells:
            with open(os.path.join(out, task.name, cell_name(lr, bs, seed), "result.json"), encoding="utf-8") as f:
                records.append(json.load(f))
    return records
