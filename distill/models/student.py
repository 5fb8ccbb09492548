"""Student initialisation: by layer selection, or at a chosen size from scratch.

Layer selection: a student of ``len(layers)`` layers gets the teacher's embeddings, the
selected teacher layers (1-based, in order) and the teacher's whole prediction head, with
an explicit parameter mapping per (teacher family, student family) pair. Every
student parameter is accounted for: copied from a named teacher tensor, or listed
in ``InitReport.not_copied`` (only possible when the teacher has no such part).

Chosen size (:class:`StudentSize`, MiniLM's 6x384 students): depth, width, heads and
feed-forward width are the user's; no teacher tensor fits a different width, so every
weight is initialised at random (the family's own ``_init_weights``, seeded). What is
reused is what does not depend on the width: the tokenizer and vocabulary, the number
of positions and token types, layer-norm epsilon, activation, dropout and init range.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from distill.common.assets import resolve_model_name
from distill.common.errors import UsageError
from distill.common.io import atomic_dir, atomic_write_json, check_output_dir
from distill.models.families import (
    FAMILIES,
    STUDENT_TYPES,
    Source,
    pairs_text,
    student_rule,
    student_types,
    supported_pairs,
)
from distill.models.layers import parse_layers
from distill.models.loading import (
    attach_pooler,
    check_tokenizer,
    family_of,
    load_config,
    load_model,
    num_layers,
    pooler_module,
    role_of,
)

INIT_RECORD = "student_init.json"  # written beside the weights: the layer selection the loss map defaults to
RANDOM_WIDTH = "random (width differs)"  # how a chosen-size student narrower or wider than its teacher starts
RANDOM_SAME_WIDTH = "random (chosen size; nothing copied)"  # ... and one of the teacher's width
REUSED = "tokenizer and vocabulary, position count, token types, layer-norm eps, activation, dropout, init range"


@dataclass
class InitReport:
    teacher: str
    teacher_class: str
    student_class: str
    layers: list[int]
    copied: dict[str, str] = field(default_factory=dict)  # student key -> teacher source description
    not_copied: list[str] = field(default_factory=list)


# --- which student, with which config ---------------------------------------------------------

def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def check_pair(teacher_family: str, student_type: str) -> None:
    if student_type not in student_types():
        raise UsageError(f"unknown student type {student_type!r}: choose one of {', '.join(student_types())}")
    if (teacher_family, student_type) not in supported_pairs():
        raise UsageError(
            f"a {teacher_family} teacher cannot be mapped to {_a(student_type)} {student_type} student: "
            f"supported pairs are {pairs_text()}"
        )


def student_config(teacher_config, n_layers: int, student_type: str):
    """The teacher's config with the layer count changed, and nothing training-only left in it."""
    family = family_of(teacher_config)
    rule = student_rule(family.name, student_type)
    if rule.config is None:  # the teacher's own family
        config = copy.deepcopy(teacher_config)
        setattr(config, family.num_layers_field, n_layers)
    else:
        config = rule.config(teacher_config, n_layers)
    config.output_hidden_states = False
    config.output_attentions = False
    config.architectures = None
    return config


# --- the parameter mapping --------------------------------------------------------------------

def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) + 1:] if key.startswith(prefix + ".") else key


def weight_sources(teacher_family: str, student_family: str, student_keys, layers: list[int]) -> dict[str, Source]:
    """Map each (prefix-stripped) student key to ``(description, fn(teacher_state) -> tensor)``.

    Keys are relative to the base model (``bert.``/``distilbert.``/... removed); the rule
    comes from the teacher family's entry in :mod:`distill.models.families`. Keys with no source
    are absent from the result.
    """
    rule = student_rule(teacher_family, student_family)
    sources = {key: rule.weights(key, layers) for key in student_keys}
    return {key: src for key, src in sources.items() if src is not None}


def build_student(teacher, layers, student_type: str | None = None, teacher_name: str = "") -> tuple[torch.nn.Module, InitReport]:
    """Build an initialised student (in memory) from a loaded ``teacher``.

    ``layers`` are 1-based teacher layers; student layer i is a copy of teacher
    layer ``layers[i-1]``. ``student_type`` defaults to the teacher's family.
    """
    t_family = family_of(teacher)
    student_type = student_type or t_family.name
    check_pair(t_family.name, student_type)
    layers = parse_layers(layers, num_layers(teacher), what="teacher")
    role = role_of(teacher)
    s_cls = FAMILIES[student_type].cls(role)
    config = student_config(teacher.config, len(layers), student_type)
    config._attn_implementation = teacher.config._attn_implementation
    torch.manual_seed(0)  # whatever is not copied is initialised reproducibly
    student = s_cls(config)
    t_pooler = pooler_module(teacher)
    if t_pooler is not None and FAMILIES[student_type].pooler_path is not None:
        # a masked-LM student class has no pooler: give it one, filled below from the teacher's
        attach_pooler(student, t_pooler.state_dict())

    t_prefix, s_prefix = teacher.base_model_prefix, student.base_model_prefix
    t_state = {_strip(k, t_prefix): v for k, v in teacher.state_dict().items()}
    s_state = student.state_dict()
    stripped = {_strip(k, s_prefix): k for k in s_state}
    sources = weight_sources(t_family.name, student_type, stripped, layers)
    report = InitReport(teacher_name or getattr(teacher, "name_or_path", ""), type(teacher).__name__,
                        s_cls.__name__, layers)
    with torch.no_grad():
        for short, full in stripped.items():
            if short not in sources:
                report.not_copied.append(full)
                continue
            desc, fn = sources[short]
            try:
                value = fn(t_state)
            except KeyError:
                report.not_copied.append(full)
                continue
            if value.shape != s_state[full].shape:
                raise AssertionError(f"shape mismatch copying {desc} -> {full}: {tuple(value.shape)} vs {tuple(s_state[full].shape)}")
            s_state[full].copy_(value)
            report.copied[full] = desc
    student.tie_weights()
    student.eval()
    return student, report


# --- a student of chosen size, initialised at random ------------------------------------------

@dataclass(frozen=True)
class StudentSize:
    """The shape of a student built from scratch. ``None`` fields follow the teacher: its width and
    head count, and its feed-forward/width ratio (BERT: 4, so 384 wide -> 1536)."""

    num_layers: int
    hidden_size: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None


def sized_student_config(teacher_config, size: StudentSize, student_type: str | None = None):
    """The teacher's config (as :func:`student_config` makes it for ``student_type``) with depth,
    width, heads and feed-forward width replaced; the field names come from the family registry.

    Raises UsageError for a size that cannot be built (a width the heads do not divide).
    """
    t_family = family_of(teacher_config)
    student_type = student_type or t_family.name
    check_pair(t_family.name, student_type)
    for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size"):
        value = getattr(size, name)
        if value is None and name == "num_layers":
            raise UsageError("num_layers is not set: a student of chosen size needs its depth, e.g. 6")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{name}={value!r}: a student's {name.replace('_', ' ')} must be a whole number >= 1")
    t_hidden = getattr(teacher_config, t_family.hidden_size_field)
    hidden = size.hidden_size or t_hidden
    heads = size.num_heads or getattr(teacher_config, t_family.num_heads_field)
    if hidden % heads:
        near = max(heads, round(hidden / heads) * heads)
        raise UsageError(f"hidden_size {hidden} is not divisible by num_heads {heads}: every head needs the same "
                         f"whole size; use a multiple of {heads} (e.g. {near}) or a num_heads that divides {hidden}")
    t_inter = getattr(teacher_config, t_family.intermediate_size_field)
    inter = size.intermediate_size or max(1, round(t_inter * hidden / t_hidden))
    config = student_config(teacher_config, size.num_layers, student_type)
    s_family = FAMILIES[student_type]
    for field_name, value in ((s_family.hidden_size_field, hidden), (s_family.num_heads_field, heads),
                              (s_family.intermediate_size_field, inter)):
        setattr(config, field_name, value)
    t_embedding = getattr(teacher_config, "embedding_size", None)
    if t_embedding is not None and hasattr(config, "embedding_size"):
        # ELECTRA's factorised embeddings scale with the width, in the teacher's ratio (equal when its are): a
        # narrow student would otherwise keep the teacher's wide embedding table and a projection down
        config.embedding_size = max(1, round(t_embedding * hidden / t_hidden))
    return config


def size_record(student_config_, teacher_config) -> dict:
    """What a chosen-size student is, for its card and ``student_init.json``."""
    s_family, t_family = family_of(student_config_), family_of(teacher_config)
    hidden = getattr(student_config_, s_family.hidden_size_field)
    return {
        "num_layers": getattr(student_config_, s_family.num_layers_field), "hidden_size": hidden,
        "num_heads": getattr(student_config_, s_family.num_heads_field),
        "intermediate_size": getattr(student_config_, s_family.intermediate_size_field),
        "initialised": RANDOM_WIDTH if hidden != getattr(teacher_config, t_family.hidden_size_field) else RANDOM_SAME_WIDTH,
        "reused_from_teacher": REUSED,
    }


def build_sized_student(teacher_config, size: StudentSize, student_type: str | None = None, seed: int = 0,
                        attn_implementation: str | None = None) -> torch.nn.Module:
    """A randomly initialised student of ``size``, of the class the teacher's head asks for
    (a masked-LM teacher gives a masked-LM student). Only the teacher's config is read.

    The global RNG is left as it was; ``seed`` alone decides the weights.
    """
    from distill.models.loading import role_from_architectures

    student_type = student_type or family_of(teacher_config).name
    config = sized_student_config(teacher_config, size, student_type)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    role = role_from_architectures(teacher_config)
    family = FAMILIES[student_type]
    if role not in family.classes:
        raise UsageError(f"a {family.name} student has no {role!r} head: roles are {', '.join(family.classes)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = family.cls(role)(config)
    student.eval()
    return student


def sized_model_card(teacher: str, teacher_class: str, student_class: str, student_type: str, record: dict,
                     sentence=None) -> str:
    from distill.models.card import card_metadata, front_matter, teacher_label

    label = teacher_label(teacher)
    lines = [
        *front_matter(card_metadata(teacher, student_class, sentence is not None, extra_tags=["random-init"])), "",
        f"# {record['num_layers']}x{record['hidden_size']} {student_type} student of `{label}`", "",
        "Built at a chosen size with the `distill` toolkit and initialised at random; not yet distilled.", "",
        f"- teacher: `{label}` ({teacher_class})",
        f"- student class: {student_class}: {record['num_layers']} layers, hidden size {record['hidden_size']}, "
        f"{record['num_heads']} heads, feed-forward {record['intermediate_size']}",
        f"- initialised: {record['initialised']}: no teacher tensor is copied (MiniLM and MiniLMv2 train "
        "their students from scratch the same way)",
        f"- reused from the teacher: {record['reused_from_teacher']}",
    ]
    return _card_with_usage(lines, sentence)


def init_sized_student(teacher: str, size: StudentSize, output: str, student_type: str | None = None,
                       overwrite: bool = False, seed: int = 0) -> dict:
    """Write a randomly initialised student of ``size`` with the teacher's tokenizer; return its record.

    The teacher's weights are never loaded: nothing of them is used. Nothing is written if anything fails.
    """
    check_output_dir(output, overwrite)
    if student_type is not None and student_type not in student_types():
        raise UsageError(f"unknown student type {student_type!r}: choose one of {', '.join(student_types())}")
    path = resolve_model_name(teacher)  # an offline alias names an installed folder; the record keeps the alias
    config = load_config(path, "teacher")
    student_type = student_type or family_of(config).name
    s_config = sized_student_config(config, size, student_type)
    from distill.models.sentence import read_pipeline

    sentence = read_pipeline(path, s_config)  # a sentence teacher's pooling, fitted to the student's width
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"teacher {teacher!r} has no loadable tokenizer ({err.__class__.__name__}): "
                         "save the tokenizer in the teacher folder") from None
    check_tokenizer(config, tokenizer)
    student = build_sized_student(config, size, student_type, seed=seed)
    teacher_class = (getattr(config, "architectures", None) or [family_of(config).classes["base"]])[0]
    record = {"teacher": teacher, "teacher_class": teacher_class, "student_type": student_type, "layers": None,
              **size_record(s_config, config), "seed": seed}
    with atomic_dir(output, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if sentence is not None:
            sentence.write(tmp)
        (Path(tmp) / "README.md").write_text(
            sized_model_card(teacher, teacher_class, type(student).__name__, student_type, record, sentence),
            encoding="utf-8")
        atomic_write_json(Path(tmp) / INIT_RECORD, record)
    return {**record, "student_class": type(student).__name__}


# --- the saved folder -------------------------------------------------------------------------

def model_card(report: InitReport, student_type: str, sentence=None) -> str:
    from distill.models.card import card_metadata, front_matter, teacher_label

    teacher = teacher_label(report.teacher)
    lines = [
        *front_matter(card_metadata(report.teacher, report.student_class, sentence is not None,
                                    extra_tags=["layer-selection"])), "",
        f"# {len(report.layers)}-layer {student_type} student of `{teacher}`", "",
        "Initialised by layer selection with the `distill` toolkit; not yet distilled.", "",
        f"- teacher: `{teacher}` ({report.teacher_class})",
        f"- teacher layers copied (1-based): {','.join(map(str, report.layers))}",
        f"- student class: {report.student_class}",
        "- copied: embeddings, the selected layers, and the teacher's prediction head where it has one",
    ]
    pooler = FAMILIES[student_type].pooler_path
    if pooler and any(f".{pooler}." in k or k.startswith(f"{pooler}.") for k in report.copied):
        lines.append(f"- the teacher's pooler (`{pooler}`), so a sequence classifier built from this folder starts from it")
    if report.not_copied:
        lines.append(f"- randomly initialised (the teacher has no such part): {', '.join(report.not_copied)}")
    return _card_with_usage(lines, sentence)


def _card_with_usage(lines: list[str], sentence) -> str:
    """A student card's lines, then its sentence-transformers pipeline (if any) and how to load the folder."""
    from distill.models.card import sentence_usage

    if sentence is not None:
        lines.append(f"- sentence-transformers pipeline, as the teacher's: {sentence.describe()}")
    lines += ["", "```python", "from transformers import AutoModel", "model = AutoModel.from_pretrained(\"<this folder>\")",
              "```", ""]
    if sentence is not None:
        lines += sentence_usage()
    return "\n".join(lines)


def init_student(teacher: str, layers, output: str, student_type: str | None = None, overwrite: bool = False) -> InitReport:
    """Write an initialised student folder: config, model.safetensors, tokenizer, README card.

    ``teacher`` is a hub id or a local folder. Nothing is written if anything fails.
    """
    check_output_dir(output, overwrite)
    if student_type is not None and student_type not in student_types():
        raise UsageError(f"unknown student type {student_type!r}: choose one of {', '.join(student_types())}")
    # every check that needs only the config runs before the (possibly slow) weight load
    path = resolve_model_name(teacher)  # an offline alias names an installed folder; the record keeps the alias
    config = load_config(path, "teacher")
    check_pair(family_of(config).name, student_type or family_of(config).name)
    parse_layers(layers, num_layers(config), what="teacher")
    from distill.models.sentence import read_pipeline

    # a sentence-transformers teacher: its pipeline travels (checked against the student's width now)
    sentence = read_pipeline(path, student_config(config, len(parse_layers(layers, num_layers(config))),
                                                  student_type or family_of(config).name))
    teacher_model = load_model(path, what="teacher")
    student_type = student_type or family_of(teacher_model).name
    student, report = build_student(teacher_model, layers, student_type, teacher_name=teacher)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"teacher {teacher!r} has no loadable tokenizer ({err.__class__.__name__}): "
                         "save the tokenizer in the teacher folder") from None
    check_tokenizer(teacher_model.config, tokenizer)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if sentence is not None:
            sentence.write(tmp)
        (Path(tmp) / "README.md").write_text(model_card(report, student_type, sentence), encoding="utf-8")
        atomic_write_json(Path(tmp) / INIT_RECORD, {
            "teacher": teacher, "teacher_class": report.teacher_class, "student_type": student_type,
            "layers": report.layers, "not_copied": report.not_copied,
        })
    return report


def read_init_record(folder: str) -> dict | None:
    """The layer selection a student folder was initialised with, if it was made by this toolkit."""
    path = Path(folder) / INIT_RECORD
    return json.loads(path.read_text()) if path.exists() else None


__all__ = ["build_sized_student", "build_student", "init_sized_student", "init_student", "read_init_record",
           "size_record", "sized_student_config", "student_config", "weight_sources", "InitReport", "StudentSize",
           "STUDENT_TYPES"]
