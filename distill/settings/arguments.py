"""One argument convention for every console script: dataclass fields become flags, their help the help.

``distill-train`` (:class:`distill.settings.config.DistillConfig`) and ``glue-eval``
(``GlueArguments`` + transformers' ``TrainingArguments``) both build their parser
with :class:`DataclassParser`, transformers' ``HfArgumentParser`` with three
additions:

- JSON-valued fields (``dict``, ``list[list[int]]``) take JSON on the command line
  (``--weights '{"ce": 5, "mlm": 2}'``); ``list[int]`` fields take ``1,5,8,12`` or
  JSON; optional fields take ``none``/``null``. The same conversion serves values
  read from recipe files (:func:`coerce`), so a file and a flag mean the same thing.
- Field metadata may carry facts for the docs and for validation (``range``,
  ``section``...); only argparse's own keys reach argparse.
- A bad flag is one ``error: ...`` line on stderr and exit code 2, like every
  other bad input.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import types
import typing

from transformers import HfArgumentParser

from distill.common.errors import ArgumentParser, UsageError

_ARGPARSE_KEYS = ("help", "choices", "metavar", "aliases", "nargs", "const")
_NONE = ("none", "null")


def _split_optional(hint) -> tuple[object, bool]:
    """``X | None`` -> (X, True); ``X`` -> (X, False)."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if (origin is typing.Union or origin is types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def _kind(hint) -> str:
    """"json", "int_list", "int_or_str", "bool", "int", "float", "str" or "other" for a (non-optional) type.

    ``list[str]`` stays "other": argparse's ``nargs="+"`` (transformers' own convention for such flags)."""
    origin = typing.get_origin(hint) or hint
    if origin is dict:
        return "json"
    if origin is list:
        (item,) = typing.get_args(hint) or (None,)
        return "int_list" if item is int else "json" if typing.get_origin(item) is list else "other"
    if (origin is typing.Union or origin is types.UnionType) and set(typing.get_args(hint)) == {int, str}:
        return "int_or_str"  # a count or a word, e.g. threads: 4 or "auto"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(hint, "other")


def coerce(name: str, hint, raw):
    """A command-line string (or a recipe-file value) as a value of the field's type.

    Non-strings pass through (JSON files already hold typed values; the config's own checks judge
    them). Raises one :class:`UsageError` line naming the flag, the value and the expected form.
    """
    base, optional = _split_optional(hint)
    if raw is None or not isinstance(raw, str):
        return raw
    if optional and raw.strip().lower() in _NONE:
        return None
    kind = _kind(base)
    try:
        if kind == "json":
            return json.loads(raw)
        if kind == "int_list":
            text = raw.strip()
            return json.loads(text) if text.startswith("[") else [int(x) for x in text.split(",") if x.strip()]
        if kind == "bool":
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        if kind == "int_or_str":
            text = raw.strip()
            return int(text) if text.lstrip("+-").isdigit() else text
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except (ValueError, json.JSONDecodeError):
        example = {"json": "JSON, e.g. '{\"ce\": 5}' or '[[4, 12]]'", "int_list": "whole numbers, e.g. 1,5,8,12",
                   "bool": "true or false", "int": "a whole number", "float": "a number"}[kind]
        raise UsageError(f"--{name} {raw!r} is not valid: give {example}") from None
    return raw


def gather_repeated(argv: list[str], flag: str, rest: str) -> tuple[list[str], bool]:
    """``--teacher A --teacher B C`` -> ``--teacher A --rest B C`` (argparse keeps a repeated flag's last value
    only), and whether ``flag`` was given at all. ``--flag=value`` counts too."""
    out, more, seen, i = [], [], False, 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == flag and (eq or i + 1 < len(argv)):
            value = value if eq else argv[i + 1]
            i += 1 if eq else 2
            (more.append(value) if seen else out.extend([flag, value]))
            seen = True
            continue
        out.append(argv[i])
        i += 1
    return out + ([rest, *more] if more else []), seen


def _converter(name: str, hint):
    def convert(raw: str):
        try:
            return coerce(name, hint, raw)
        except UsageError as err:  # argparse words its own message for ValueError; keep ours
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"--{name} ")) from None

    convert.__name__ = name
    return convert


class DataclassParser(HfArgumentParser):
    """``HfArgumentParser`` that also takes JSON-valued and comma-list fields, and fails in one line."""

    error = ArgumentParser.error

    def __init__(self, dataclass_types, **kwargs):
        # HfArgumentParser writes each field's resolved type into the dataclass's shared Field objects;
        # put back what the class declared, so building a parser changes nothing that others read.
        types_ = dataclass_types if isinstance(dataclass_types, (list, tuple)) else [dataclass_types]
        declared = [(f, f.type) for t in types_ for f in dataclasses.fields(t)]
        try:
            super().__init__(dataclass_types, **kwargs)
        finally:
            for f, hint in declared:
                f.type = hint
        # a value that starts with a minus sign and a digit ("-1,2", "-0.5", "-1e-3") is a value, not a flag, so its
        # field's own check words the error (argparse only takes "-1" and "-0.5" as numbers)
        self._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+-]*$")

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        base, optional = _split_optional(field.type)
        kind = _kind(base)
        meta = {k: v for k, v in field.metadata.items() if k in _ARGPARSE_KEYS}
        if kind in ("json", "int_list", "int_or_str") or (optional and kind in ("int", "float", "str")):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            options = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
            metavar = {"json": "JSON", "int_list": "L1,L2,...", "int_or_str": "INT|auto"}.get(kind, kind.upper())
            parser.add_argument(*options, type=_converter(field.name, field.type),
                                default=default, metavar=meta.get("metavar", metavar), help=meta.get("help"),
                                **{k: meta[k] for k in ("choices", "nargs", "const") if k in meta})
            return
        field = copy.copy(field)
        field.metadata = types.MappingProxyType(meta)
        HfArgumentParser._parse_dataclass_field(parser, field)
