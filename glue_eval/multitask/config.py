"""The multi-task configuration: one JSON file names the tasks, their heads, weights and teachers, and how they
are trained together. docs/multitask.md documents every key; paths are relative to the file.

    {"tasks": [{"task": "polarity.json", "head": {"layers": [128], "activation": "gelu"}, "weight": 1.0,
                "teacher": "teachers/polarity"},
               {"task": "sst2", "head": {"transformers": "RobertaClassificationHead"}}],
     "sampling": {"kind": "temperature", "temperature": 2.0},
     "schedule": {"mode": "hybrid", "window": 20, "patience": 3, "sum_every": 10},
     "gradient": "pcgrad"}
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from distill.common.errors import UsageError
from distill.common.io import read_json_object

from ..tasks import Task, get_task

TOP_KEYS = ("tasks", "sampling", "schedule", "gradient", "distill_weights")
TASK_KEYS = ("task", "head", "weight", "teacher")
HEAD_KEYS = {"stack": ("layers", "activation", "dropout", "pooling"), "transformers": ("transformers", "config"),
             "span": ("span", "layers", "activation", "dropout")}
SAMPLING_KINDS = ("proportional", "uniform", "temperature", "annealed")
SAMPLING_KEYS = ("kind", "temperature", "final_exponent")
SCHEDULE_MODES = ("per_task", "sum", "hybrid")
SCHEDULE_KEYS = ("mode", "window", "patience", "min_delta", "sum_every")
GRADIENTS = ("sum", "pcgrad")
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class HeadSpec:
    """A task's head. ``stack``: linear layers of widths ``layers`` (then the output layer), each followed by
    ``activation`` and dropout, over the pooled encoder output (``cls``: the first token; ``mean``: the mean over
    real tokens); ``layers=()`` is one linear layer. ``transformers``: a transformers head class by name, built
    from the encoder's config updated with ``config`` (and the task's ``num_labels``), called on the last
    hidden states ``[B, S, H]``. ``span`` (an extractive-QA task's): the same stack on every token, then a linear
    layer of 2 outputs per token (the start and end logits, as transformers' ``qa_outputs``); no pooling."""

    kind: str = "stack"
    layers: tuple[int, ...] = ()
    activation: str = "gelu"
    dropout: float = 0.1
    pooling: str = "cls"
    class_name: str | None = None
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        if self.kind == "transformers":
            return {"transformers": self.class_name, "config": dict(self.config)}
        if self.kind == "span":
            return {"span": True, "layers": list(self.layers), "activation": self.activation, "dropout": self.dropout}
        return {"layers": list(self.layers), "activation": self.activation, "dropout": self.dropout,
                "pooling": self.pooling}


@dataclass(frozen=True)
class TaskEntry:
    """One task of the run: its registry entry, head, loss weight (in meta-batch sums) and optional teacher."""

    task: Task
    head: HeadSpec
    weight: float = 1.0
    teacher: str | None = None


@dataclass(frozen=True)
class Sampling:
    """Which task a batch comes from: ``p_i ∝ n_i ** exponent`` (:mod:`glue_eval.multitask.sampling`)."""

    kind: str = "proportional"
    temperature: float = 1.0
    final_exponent: float = 0.2  # annealed: from 1 (proportional) at the start to this at the end


@dataclass(frozen=True)
class Schedule:
    """``per_task`` (one task per batch), ``sum`` (meta-batches: one batch of every task, weighted loss sum) or
    ``hybrid`` (sum until the windowed loss stops improving by ``min_delta`` for ``patience`` windows of ``window``
    steps, then per-task steps with a sum step every ``sum_every``)."""

    mode: str = "per_task"
    window: int = 20
    patience: int = 3
    min_delta: float = 0.0
    sum_every: int = 10


@dataclass(frozen=True)
class MultitaskConfig:
    tasks: tuple[TaskEntry, ...]
    sampling: Sampling = Sampling()
    schedule: Schedule = Schedule()
    gradient: str = "sum"
    distill_weights: dict | None = None
    path: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.task.name for e in self.tasks)

    def entry(self, name: str) -> TaskEntry:
        return {e.task.name: e for e in self.tasks}[name]


def _unknown(where: str, given: dict, allowed) -> None:
    extra = sorted(set(given) - set(allowed))
    if extra:
        raise UsageError(f"{where} has unknown keys {extra}: allowed keys are {sorted(allowed)}")


def _number(where: str, key: str, value, low: float, integer: bool = False, open_low: bool = False):
    kind = int if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
    if bad or value < low or (open_low and value == low):
        bound = f"> {low}" if open_low else f">= {low}"
        raise UsageError(f"{where}: {key} is {value!r}: give {'a whole number' if integer else 'a number'} {bound}")
    return value


def parse_head(where: str, head, qa: bool = False) -> HeadSpec:
    """A head entry -> :class:`HeadSpec`. Absent: one linear layer on the first token, or for an extractive-QA
    task (``qa``) the span head: one linear layer of 2 outputs per token, no dropout (transformers' QA head)."""
    if head is None:
        return HeadSpec(kind="span", dropout=0.0) if qa else HeadSpec()
    if not isinstance(head, dict):
        raise UsageError(f'{where}: head must be an object, e.g. {{"layers": [128], "activation": "gelu"}} or '
                         '{"transformers": "RobertaClassificationHead"}')
    if "transformers" in head:
        if qa:
            raise UsageError(f"{where} is extractive QA: its head is a span head on every token; give "
                             '{"layers": [...], "activation": "gelu", "dropout": 0.1} or no head, not a transformers '
                             "classification head")
        _unknown(f"{where} head", head, HEAD_KEYS["transformers"])
        name, config = head["transformers"], head.get("config", {})
        if not isinstance(name, str) or not name or not isinstance(config, dict):
            raise UsageError(f'{where}: a transformers head is {{"transformers": "CLASS NAME", "config": {{...}}}}')
        return HeadSpec(kind="transformers", class_name=name, config=dict(config))
    if "span" in head and not qa:
        raise UsageError(f"{where}: a span head is for extractive QA tasks; this task takes a classification head, "
                         'e.g. {"layers": [128], "activation": "gelu"}')
    _unknown(f"{where} head", head, HEAD_KEYS["span" if qa else "stack"])
    stack = _stack_fields(where, head, default_dropout=0.0 if qa else 0.1)
    if qa:
        return HeadSpec(kind="span", **stack)
    pooling = head.get("pooling", "cls")
    if pooling not in POOLINGS:
        raise UsageError(f"{where}: head pooling {pooling!r}: choose {' or '.join(POOLINGS)}")
    return HeadSpec(pooling=pooling, **stack)


def _stack_fields(where: str, head: dict, default_dropout: float) -> dict:
    """The ``layers``, ``activation`` and ``dropout`` of a stack or span head, each checked."""
    layers = head.get("layers", [])
    if not isinstance(layers, list) or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in layers):
        raise UsageError(f"{where}: head layers {layers!r} must be a list of widths >= 1, e.g. [256, 128] ([] = "
                         "one linear layer)")
    activation = head.get("activation", "gelu")
    from transformers.activations import ACT2FN

    if activation not in ACT2FN:
        raise UsageError(f"{where}: unknown activation {activation!r}; choose one of {', '.join(sorted(ACT2FN))}")
    dropout = head.get("dropout", default_dropout)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UsageError(f"{where}: head dropout {dropout!r}: give a probability in [0, 1)")
    return {"layers": tuple(layers), "activation": activation, "dropout": float(dropout)}


def _task_entry(i: int, item, base: str) -> TaskEntry:
    where = f"task {i}"
    if not isinstance(item, dict) or "task" not in item:
        raise UsageError(f'{where} must be an object with "task" (a GLUE name or a task spec .json), e.g. '
                         '{"task": "polarity.json"}')
    _unknown(where, item, TASK_KEYS)
    name = item["task"]
    if not isinstance(name, str):
        raise UsageError(f"{where}: task {name!r} must be a GLUE task name or a task spec .json path")
    task = get_task(os.path.join(base, name) if name.endswith(".json") else name)
    where = f"task {task.name!r}"
    weight = float(_number(where, "weight", item.get("weight", 1.0), 0.0))
    teacher = item.get("teacher")
    if teacher is not None:
        teacher = os.path.join(base, teacher)
        if not os.path.isfile(os.path.join(teacher, "config.json")):
            raise UsageError(f"{where}: teacher {teacher!r} is not a model folder (no config.json): give a teacher "
                             "fine-tuned on this task (glue-eval --save_model)")
    return TaskEntry(task=task, head=parse_head(where, item.get("head"), qa=task.is_qa), weight=weight,
                     teacher=teacher)


def _sampling(given) -> Sampling:
    given = {"kind": given} if isinstance(given, str) else given
    if not isinstance(given, dict):
        raise UsageError(f'sampling {given!r}: give an object, e.g. {{"kind": "temperature", "temperature": 2}}')
    _unknown("sampling", given, SAMPLING_KEYS)
    kind = given.get("kind", "proportional")
    if kind not in SAMPLING_KINDS:
        raise UsageError(f"sampling kind {kind!r}: choose one of {', '.join(SAMPLING_KINDS)}")
    if "temperature" in given and kind != "temperature":
        raise UsageError(f'sampling: "temperature" is for kind "temperature", not {kind!r}')
    temperature = float(_number("sampling", "temperature", given.get("temperature", 1.0), 0.0, open_low=True))
    final = float(_number("sampling", "final_exponent", given.get("final_exponent", 0.2), 0.0))
    return Sampling(kind=kind, temperature=temperature, final_exponent=final)


def _schedule(given) -> Schedule:
    given = {"mode": given} if isinstance(given, str) else given
    if not isinstance(given, dict):
        raise UsageError(f'schedule {given!r}: give an object, e.g. {{"mode": "hybrid", "sum_every": 10}}')
    _unknown("schedule", given, SCHEDULE_KEYS)
    mode = given.get("mode", "per_task")
    if mode not in SCHEDULE_MODES:
        raise UsageError(f"schedule mode {mode!r}: choose one of {', '.join(SCHEDULE_MODES)}")
    ints = {k: _number("schedule", k, given.get(k, getattr(Schedule, k)), 1, integer=True)
            for k in ("window", "patience", "sum_every")}
    return Schedule(mode=mode, min_delta=float(_number("schedule", "min_delta", given.get("min_delta", 0.0), 0.0)),
                    **ints)


def parse_config(raw: dict, base: str = ".", path: str | None = None) -> MultitaskConfig:
    """A config object (read from JSON) -> :class:`MultitaskConfig`; paths in it are relative to ``base``."""
    _unknown("multitask config", raw, TOP_KEYS)
    items = raw.get("tasks")
    if not isinstance(items, list) or len(items) < 1:
        raise UsageError('multitask config: "tasks" must be a non-empty list, e.g. [{"task": "polarity.json"}, '
                         '{"task": "bbc.json"}]')
    entries = tuple(_task_entry(i, item, base) for i, item in enumerate(items, start=1))
    names = [e.task.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"multitask config: task {twice[0]!r} is listed twice: each task has one head")
    gradient = raw.get("gradient", "sum")
    if gradient not in GRADIENTS:
        raise UsageError(f"gradient {gradient!r}: choose {' or '.join(GRADIENTS)}")
    schedule = _schedule(raw.get("schedule", {}))
    if gradient == "pcgrad" and schedule.mode == "per_task":
        raise UsageError('gradient "pcgrad" projects the tasks of a meta-batch against each other: one task per '
                         'batch has nothing to project; use schedule "sum" or "hybrid"')
    weights = raw.get("distill_weights")
    if weights is not None:
        from ..distillation import parse_weights

        weights = parse_weights(weights)
    if weights is not None and not any(e.teacher for e in entries):
        raise UsageError('multitask config: "distill_weights" weight the teachers\' terms, but no task names a '
                         '"teacher"')
    return MultitaskConfig(tasks=entries, sampling=_sampling(raw.get("sampling", {})), schedule=schedule,
                           gradient=gradient, distill_weights=weights, path=path)


def load_config(path: str) -> MultitaskConfig:
    raw = read_json_object(path, "multitask config", "give a JSON file (see docs/multitask.md)")
    return parse_config(raw, os.path.dirname(os.path.abspath(path)), path)
