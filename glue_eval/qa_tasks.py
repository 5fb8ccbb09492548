"""Extractive question answering as a task of the registry: SQuAD v1.1 and v2.0, SQuAD-format task specs, and
out-of-domain evaluation files.

A QA task is a :class:`glue_eval.tasks.Task` with ``kind = "extractive_qa"``; this module gives the fields
(:mod:`glue_eval.tasks` builds the Task, so this module does not import it). Its splits are read by
:mod:`glue_eval.qa_data`, encoded into windows by :mod:`glue_eval.qa`, scored by
:mod:`glue_eval.squad_metrics`.
"""

from __future__ import annotations

import dataclasses
import os
import re

from distill.common.errors import UsageError

EXTRACTIVE_QA = "extractive_qa"
QA_METRICS = ("exact_match", "f1")
QA_TEXT_FIELDS = ("question", "context")

# SQuAD's own file names (the files of its website) and the hub's copies.
SQUAD_FILES = {
    "squad": {"train": "train-v1.1.json", "validation": "dev-v1.1.json"},
    "squad_v2": {"train": "train-v2.0.json", "validation": "dev-v2.0.json"},
}
SQUAD_HUB = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
_DISPLAY = {"squad": "SQuAD", "squad_v2": "SQuAD-v2"}


def squad_task_fields(name: str) -> dict:
    """The Task fields of ``squad`` or ``squad_v2`` (data from ``--data_dir`` or the hub)."""
    return dict(name=name, display=_DISPLAY[name], text_fields=QA_TEXT_FIELDS, labels=None, metrics=QA_METRICS,
                test_splits={}, glue=False, kind=EXTRACTIVE_QA, version_2=name == "squad_v2")


QA_SPEC_KEYS = {"name", "type", "train", "dev", "version_2"}


def qa_spec_fields(spec: dict, path: str) -> dict:
    """The Task fields of a QA task spec: ``{"name": "newsqa", "type": "extractive_qa", "train": "train.json",
    "dev": "dev.json", "version_2": false}``; files in SQuAD's JSON layout (or JSON lines of the hub's
    ``id, question, context, answers`` rows), paths relative to the spec file."""
    where = f"task spec {path!r}"
    unknown = set(spec) - QA_SPEC_KEYS
    if unknown:
        raise UsageError(f"{where} has unknown keys {sorted(unknown)}: an extractive_qa spec has {sorted(QA_SPEC_KEYS)}")
    for key in ("name", "train", "dev"):
        if key not in spec:
            raise UsageError(f"{where} lacks {key!r}: an extractive_qa spec names its train and dev files")
    if not isinstance(spec.get("version_2", False), bool):
        raise UsageError(f"{where}: version_2 is {spec['version_2']!r}: give true (questions may have no answer) "
                         "or false")
    base = os.path.dirname(os.path.abspath(path))
    files = {"train": os.path.join(base, spec["train"]), "validation": os.path.join(base, spec["dev"])}
    name = str(spec["name"])
    return dict(name=name, display=name, text_fields=QA_TEXT_FIELDS, labels=None, metrics=QA_METRICS,
                test_splits={}, files=files, glue=False, kind=EXTRACTIVE_QA,
                version_2=bool(spec.get("version_2", False)))


def split_name(path: str) -> str:
    """The dev split an ``--eval_files`` file is reported under: its file name without the extension."""
    stem = os.path.basename(path)
    for ext in (".jsonl", ".json"):
        stem = stem.removesuffix(ext)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "eval"


def with_eval_files(task, eval_files):
    """``task`` with one more dev split per out-of-domain file (reported beside the in-domain ``validation``;
    the task's score and checkpoint selection stay the in-domain one)."""
    if not eval_files:
        return task
    if getattr(task, "kind", None) != EXTRACTIVE_QA:
        raise UsageError(f"--eval_files is for extractive QA tasks (squad, squad_v2, an extractive_qa spec); "
                         f"{task.display} is not one")
    files = dict(task.files or {})
    splits = list(task.dev_splits)
    for path in eval_files:
        if not os.path.isfile(path):
            raise UsageError(f"--eval_files: {path!r} does not exist: give SQuAD-format JSON files")
        name = split_name(path)
        if name in splits or name == "train":
            raise UsageError(f"--eval_files: two sets would be reported as {name!r}: give files with distinct names")
        splits.append(name)
        files[name] = os.path.abspath(path)
    return dataclasses.replace(task, dev_splits=tuple(splits), files=files)


def qa_task_settings(task, digest) -> dict:
    """What defines a QA task for cell reuse: its kind, SQuAD version and its files by content (``digest``)."""
    return {"kind": EXTRACTIVE_QA, "version_2": task.version_2,
            "files": {split: digest(path) for split, path in (task.files or {}).items() if os.path.isfile(path)}}


def qa_cell_settings(glue) -> dict:
    """The windowing and decoding settings of a QA cell (a finished cell is reused only when they match)."""
    return {k: getattr(glue, k) for k in ("doc_stride", "max_answer_length", "n_best_size", "null_score_diff_threshold")}
