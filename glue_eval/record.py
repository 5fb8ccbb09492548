"""What defines a cell (so a finished one is reused only when these match) and its task's data by content."""

from __future__ import annotations

import glob
import json
import os

from transformers import TrainingArguments

from distill.common.errors import UsageError
from distill.common.io import atomic_write_text

from .arguments import GlueArguments
from .qa_tasks import EXTRACTIVE_QA, qa_cell_settings
from .tasks import Task
from .teachers import mixture_weights, teacher_paths


def file_digest(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def task_settings(task: Task) -> dict | None:
    """What defines a local task for cell reuse: its files by content, its labels, text columns and metrics (a spec
    pointing at other or edited data must not reuse cells; the same data under another path may). None for GLUE
    tasks, whose data is ``data_dir``."""
    if task.is_qa:
        from .qa_tasks import qa_task_settings

        return qa_task_settings(task, file_digest)
    if not task.files:
        return None
    return {
        "files": {split: file_digest(path) for split, path in task.files.items() if os.path.isfile(path)},
        "labels": list(task.labels) if task.labels else None, "text_fields": list(task.text_fields),
        "metrics": list(task.metrics),
    }


# TrainingArguments fields (a grid file may set any) that change what a cell trains or how its model is chosen,
# recorded only when they differ from the defaults; a record says it holds them (TRAINING_MARKER), so a cell
# recorded before they were (set or not) is still reused as it was then
TRAINING_FIELDS = ("max_grad_norm", "label_smoothing_factor", "adam_beta1", "adam_beta2", "adam_epsilon", "optim",
                   "optim_args", "lr_scheduler_kwargs", "load_best_model_at_end", "metric_for_best_model",
                   "greater_is_better", "eval_strategy", "eval_steps", "dataloader_drop_last",
                   "train_sampling_strategy", "data_seed", "neftune_noise_alpha", "average_tokens_across_devices")


TRAINING_MARKER = "training_fields"


def _plain(value):
    """A TrainingArguments value as JSON keeps it (enums by their value)."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


def fields_set(args: TrainingArguments, names) -> dict:
    """Those of ``names`` whose value in ``args`` differs from a default ``args`` of the same class (JSON-able)."""
    defaults = type(args)(output_dir=args.output_dir)
    return {name: _plain(getattr(args, name)) for name in names
            if hasattr(args, name) and _plain(getattr(args, name)) != _plain(getattr(defaults, name))}


def changed_training_fields(args: TrainingArguments) -> dict:
    """:data:`TRAINING_FIELDS` whose value differs from the defaults."""
    return fields_set(args, TRAINING_FIELDS)


def describe(glue: GlueArguments, args: TrainingArguments, task_data: dict | None = None) -> dict:
    """The settings that define a cell; a finished cell is reused only if these match. ``task_data``:
    :func:`task_settings` of the cell's task."""
    weights = json.loads(glue.distill_weights) if glue.teacher else None
    return {
        "task_data": task_data,
        "model": glue.model,
        "tokenizer": glue.tokenizer,
        "data_dir": glue.data_dir,
        "max_seq_length": glue.max_seq_length,
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "seed": args.seed,
        "fp16": args.fp16,
        "bf16": args.bf16,
        "teacher": glue.teacher,
        "distill_weights": weights,
        "temperature": glue.temperature if glue.teacher else None,
        "student_layers": glue.student_layers if glue.teacher else None,
        # a shared objective setting joins the cell's settings only when set, so older cells still match
        **({"layer_map": glue.layer_map} if glue.teacher and glue.layer_map is not None else {}),
        **task_stage_settings(glue),
        **(qa_cell_settings(glue) if task_data and task_data.get("kind") == EXTRACTIVE_QA else {}),
        **({"teachers": teacher_paths(glue), "teacher_weights": mixture_weights(glue)}
           if len(teacher_paths(glue)) > 1 else {}),
        # recorded when set; a cell recorded before the option existed is reused (its batches ran as one forward:
        # the same distribution, other dropout masks), so it is not in RECORDED_WHEN_SET
        **({"length_groups": args.length_groups} if getattr(args, "length_groups", 1) > 1 else {}),
        TRAINING_MARKER: 1, **changed_training_fields(args),
        **({k: getattr(glue, k) for k in ("teacher_gate", "gate_layers", "gate_balance", "gate_epochs",
                                           "gate_learning_rate")} if glue.teacher and glue.teacher_gate != "none" else {}),
    }


def task_stage_settings(glue: GlueArguments) -> dict:
    """The --teacher run's data and stages as cell settings (files by content); empty without them, so cells
    recorded before these options existed still match."""
    if not glue.teacher:
        return {}
    out = {}
    if glue.stages:
        from .distillation import parse_stages

        out["stages"] = parse_stages(glue.stages)
    if glue.augment:
        from .augment import model_digest

        out["augment"] = {"variants": glue.augment, "probability": glue.augment_probability,
                          "candidates": glue.augment_candidates,
                          "model": model_digest(glue.augment_model) if glue.augment_model else None}
    if glue.unlabelled_file:
        out["unlabelled_file"] = file_digest(glue.unlabelled_file)
    return out


# --- the result a cell writes, and the grid's reader ----------------------------------------------

# The cell settings describe() writes only when they are set (so cells recorded before they existed match).
RECORDED_WHEN_SET = ("layer_map", "stages", "augment", "unlabelled_file", "teachers", "teacher_weights",
                     "teacher_gate", "gate_layers", "gate_balance", "gate_epochs", "gate_learning_rate")


def done(cell_dir: str, settings: dict) -> bool:
    """Whether ``cell_dir`` holds a finished result of these settings; one line if it holds other ones."""
    path = os.path.join(cell_dir, "result.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        old = json.load(f).get("settings", {})
    # A setting newer than the record (absent from it) is not held against it, except those describe() records
    # only when set: for them absence means "not set", so a run that sets one is not the recorded cell.
    # TRAINING_FIELDS likewise, in a record that holds them (older records did not write them even when set)
    when_set = RECORDED_WHEN_SET + (TRAINING_FIELDS if old.get(TRAINING_MARKER) else ())
    diff = sorted(k for k in set(old) | set(settings)
                  if (k in old or k in when_set) and old.get(k) != settings.get(k))
    if diff:
        k = diff[0]
        raise UsageError(
            f"{cell_dir} already holds a result with other settings ({k}: {old.get(k)!r} there, "
            f"{settings.get(k)!r} now): use another --output_dir, or delete that cell folder to redo it"
        )
    return True


def write_result(cell_dir: str, record: dict, settings: dict) -> None:
    import torch
    import transformers

    record = {"cell": os.path.basename(cell_dir), **record, "settings": settings,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    atomic_write_text(os.path.join(cell_dir, "result.json"), json.dumps(record, indent=2) + "\n")


def read_results(out: str) -> list[dict]:
    """Every finished cell under ``out`` (any grid, any task), sorted by task and cell."""
    records = []
    for path in sorted(glob.glob(os.path.join(out, "*", "*", "result.json"))):
        with open(path, encoding="utf-8") as f:
            records.append(json.load(f))
    return records


def write_results_jsonl(out: str) -> None:
    lines = [json.dumps(r, sort_keys=True) for r in read_results(out)]
    atomic_write_text(os.path.join(out, "results.jsonl"), "".join(line + "\n" for line in lines))
