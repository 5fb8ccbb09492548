"""How a setting is declared: once, as a dataclass field whose metadata carries everything else.

``setting(default, help, range=..., auto=..., resume=..., task=...)`` is the one place a setting's
name, type (the annotation), default, allowed range, help text, whether a resumed run must keep it and
whether glue-eval's task stage shares it are written. The command lines, the checks (one bound, one
message: :meth:`Range.check`), ``RESUME_FIELDS``, the run record, glue-eval's defaults and
docs/configuration.md are read from these fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from distill.common.errors import UsageError

AUTO = "auto"  # fields with auto=True also take "auto": the machine decides (distill.common.hardware)


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field: finite, between ``low`` and ``high`` (open ends where marked).

    Written as in mathematics, ``[0, 1)``, in --help and in the error for a value outside it.
    """

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        try:
            value = float(value)
        except (OverflowError, TypeError, ValueError):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        high = "inf)" if math.isinf(self.high) else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {high}"

    def check(self, name: str, value, auto: bool = False):
        """``value`` if it is a number inside the range, else the one :class:`UsageError` line for ``name``."""
        if isinstance(value, bool) or value not in self:
            also = ' or "auto"' if auto else ""
            raise UsageError(f"{name}={value!r} is out of range: it must be a finite number in {self}{also}")
        return value


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
UNIT = Range(0, 1)  # a fraction or probability, ends included


def setting(default, help: str, *, range: Range | None = None, auto: bool = False, resume: bool = True,
            task: bool = False, task_default=dataclasses.MISSING, task_help: str | None = None, **kw):
    """One setting's whole declaration, as a dataclass field.

    range: the allowed values of a number (checked once, for every caller).
    auto: the field also takes "auto" (the machine decides).
    resume: a resumed run must keep its value (it decides what each step computes); False for what may
        change between the pieces of one run (logging, checkpoint cadence, device, workers).
    task: glue-eval's task stage (``--teacher``) has the same setting, under the same name;
        ``task_default`` / ``task_help``: its default and help there when they differ (e.g. the temperature).
    """
    meta = {"help": help, "range": range, "auto": auto, "resume": resume, "task": task,
            "task_default": default if task_default is dataclasses.MISSING else task_default,
            "task_help": help if task_help is None else task_help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def default_of(f: dataclasses.Field):
    """A field's default value (a fresh copy for list and dict defaults)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def resume_fields(cls) -> tuple[str, ...]:
    """The fields of dataclass ``cls`` that a resumed run must keep."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume", True))


def task_fields(cls) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that glue-eval's task stage shares."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("task")]


def check_ranges(obj) -> None:
    """Every field of dataclass instance ``obj`` against its declared range: one UsageError line."""
    for f in dataclasses.fields(obj):
        allowed, value = f.metadata.get("range"), getattr(obj, f.name)
        if allowed is None or value is None or (f.metadata.get("auto") and value == AUTO):
            continue
        allowed.check(f.name, value, f.metadata.get("auto", False))
