"""Several teachers with fixed weights: ``--teacher A --teacher B --teacher_weights 0.7,0.3``.

The student learns from the weighted mixture of the teachers' soft targets. :class:`TeacherMixture` runs every
teacher and returns logits whose tempered softmax *is* that mixture,

    z_mix = T * log( sum_k w_k softmax(z_k / T) )      so that  softmax(z_mix / T) = sum_k w_k softmax(z_k / T),

computed in log space (``logsumexp`` of ``log w_k + log_softmax(z_k / T)``) so it stays finite; the soft-target
terms (``kl``, ``ce``) and the teacher cache then read it as one teacher's logits, unchanged. A one-output
(regression) head mixes its outputs by the same weights; an extractive-QA head mixes its start and its end
distributions over each window's real tokens. Weights are normalised to sum to 1 (default: equal); with fixed
weights a teacher listed twice counts once with the sum of its weights (one teacher left is the one-teacher run).

Representation terms (``hid_mse``, ``att_mse``, ``cos`` ...) have no distribution to mix: as in distill-train,
:func:`mixture_objective` builds a :class:`distill.objective.mixture.TeacherMix`, each teacher's term through its
own layer map (the first teacher's ``--student_layers`` / ``--layer_map``, scaled to the depth of a teacher of
another depth by :func:`distill.objective.mixture.scaled_layer_map`), summed with the same weights (equal under
``entropy``), while ``kl`` / ``ce`` read the mixture of the teachers' soft targets. The task stage's trainer then
runs (or reads from its caches) each teacher on its own. Sentence tasks only; not with ``--teacher_gate``.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

from distill.common.errors import UsageError
from distill.objective import terms
# the mixture's maths and the vocabulary check live in distill (distill-train mixes teachers too); these names
# stay importable from here
from distill.objective.mixture import (CONFIDENCE, TeacherMix, check_same_vocabulary,  # noqa: F401
                                       confidence_weights, mix_logits, parse_teacher_weights, scaled_layer_map)

PAD_LOGIT = -1e9  # a padded position of a span head: no mass in any teacher's distribution


def teacher_paths(glue) -> list[str]:
    """Every ``--teacher`` given, in order (``other_teachers`` holds the second and later ones)."""
    if not glue.teacher:
        return []
    return [glue.teacher, *[p for p in (glue.other_teachers or "").split(",") if p]]


def gather_teacher_flags(argv: list[str]) -> list[str]:
    """``--teacher A --teacher B`` -> ``--teacher A --other_teachers B`` (argparse would keep the last one only)."""
    out, more, seen, i = [], [], False, 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--teacher",) and (eq or i + 1 < len(argv)):
            value = value if eq else argv[i + 1]
            i += 1 if eq else 2
            if seen:
                more.append(value)
            else:
                out += ["--teacher", value]
                seen = True
            continue
        out.append(arg)
        i += 1
    if any("," in p for p in more):
        raise UsageError(f"--teacher {next(p for p in more if ',' in p)!r}: a teacher folder name with a comma cannot "
                         "be one of several teachers; rename the folder")
    return out + (["--other_teachers", ",".join(more)] if more else [])


def mixture_weights(glue) -> list[float] | None:
    """The normalised ``--teacher_weights`` (equal when not given); None for one teacher. One line for a bad
    value."""
    paths = teacher_paths(glue)
    if glue.teacher_weights and len(paths) < 2:
        raise UsageError("--teacher_weights weighs several teachers: give --teacher more than once")
    if len(paths) < 2:
        return None
    return parse_teacher_weights(glue.teacher_weights, len(paths))


def representation_terms(stage_weights) -> list[str]:
    """The active terms of any stage that compare a teacher's layers (not its logits), in order."""
    return list(dict.fromkeys(k for stage in stage_weights for k, w in stage.items()
                              if w and terms.TERMS[k].teacher and terms.TERMS[k].feature != "logits"))


def check_teachers(glue, stage_weights, qa_stage_weights=()) -> None:
    """Several teachers: each a model folder, weights that fit, and representation terms only where each teacher
    can take its own (sentence tasks, fixed or entropy weights); one line each. ``qa_stage_weights``: the stages
    of the extractive-QA tasks."""
    weights = mixture_weights(glue)
    if weights is None:
        if getattr(glue, "teacher_gate", "none") != "none":
            raise UsageError(f"--teacher_gate {glue.teacher_gate} weighs several teachers: give --teacher more than once")
        return
    for path in teacher_paths(glue):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"--teacher {path!r} is not a model folder (no config.json): give fine-tuned teachers")
    if glue.teacher_gate not in ("none", "softmax", "top1"):
        raise UsageError(f"--teacher_gate {glue.teacher_gate!r}: choose none, softmax or top1")
    if glue.gate_balance < 0 or glue.gate_epochs <= 0 or glue.gate_learning_rate <= 0:
        raise UsageError("--gate_balance must be >= 0, --gate_epochs and --gate_learning_rate > 0")
    inner = representation_terms([*stage_weights, *qa_stage_weights])
    if inner and glue.teacher_gate != "none":
        raise UsageError(f"--distill_weights: {inner[0]!r} compares each teacher's own layers, which the gate does "
                         f"not weigh (it mixes soft targets only): drop --teacher_gate {glue.teacher_gate} for fixed "
                         "--teacher_weights or entropy, or use the logit terms (kl, ce, hard_ce)")
    inner = representation_terms(qa_stage_weights)
    if inner:
        raise UsageError(f"--distill_weights: {inner[0]!r} compares one teacher's layers; with several extractive-QA "
                         "teachers use the span logit terms (kl, ce, hard_ce) on their mixture")


class TeacherMixture(nn.Module):
    """Several frozen teachers as one: its output's logits are :func:`mix_logits` of theirs (module docstring).
    Anything else (config, layers) is the first teacher's, which only logit terms never read. ``paths``: the
    teachers' folders, in order (for records)."""

    def __init__(self, teachers, weights, temperature: float, paths=None):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.confidence = weights == CONFIDENCE  # per-example weights from each teacher's own entropy
        weights = [1 / len(teachers)] * len(teachers) if self.confidence else weights
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.temperature = float(temperature)
        self.config = teachers[0].config
        self.paths = list(paths) if paths is not None else [f"teacher {k + 1}" for k in range(len(teachers))]

    @property
    def mix(self) -> list[float] | str:
        """The weights as :class:`distill.objective.mixture.TeacherMix` takes them: a list, or :data:`CONFIDENCE`."""
        return CONFIDENCE if self.confidence else [float(w) for w in self.weights]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("teachers")[0], name)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k in ("token_type_ids",)}
        outs = [t(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs) for t in self.teachers]
        if getattr(outs[0], "start_logits", None) is not None:  # a span head: [B, 2, S], padding at no mass
            real = attention_mask.bool()[:, None, :]
            z = [torch.stack((o.start_logits, o.end_logits), 1).float().masked_fill(~real, PAD_LOGIT) for o in outs]
            mixed = mix_logits(z, confidence_weights(z) if self.confidence else self.weights, self.temperature)
            return QuestionAnsweringModelOutput(start_logits=mixed[:, 0], end_logits=mixed[:, 1])
        z = [o.logits.float() for o in outs]
        return SequenceClassifierOutput(logits=mix_logits(z, confidence_weights(z) if self.confidence else self.weights,
                                                          self.temperature))


def merged_teachers(glue) -> tuple[list[str], list[float] | str]:
    """The teachers that teach and their weights: with fixed weights and no gate a teacher listed twice counts once
    with the sum of its weights (as distill-train does), so its terms run once, through one projection."""
    paths, weights = teacher_paths(glue), mixture_weights(glue)
    if weights == CONFIDENCE or getattr(glue, "teacher_gate", "none") not in ("none", None):
        return paths, weights
    merged: dict[str, float] = {}
    for path, weight in zip(paths, weights):
        merged[path] = merged.get(path, 0.0) + weight
    return list(merged), list(merged.values())


def load_mixture(glue, load_one, student, student_tokenizer=None):
    """Every teacher (``load_one(path)`` loads and checks one) as a :class:`TeacherMixture`, checked against the
    student's vocabulary and tokenizer (the run's own, ``--tokenizer`` or the model's, unless given); one teacher
    left after :func:`merged_teachers` is that teacher itself."""
    if student_tokenizer is None:
        from transformers import AutoTokenizer

        student_tokenizer = AutoTokenizer.from_pretrained(glue.tokenizer or glue.model)
    paths, weights = merged_teachers(glue)
    teachers = []
    for path in paths:
        teacher = load_one(path)
        check_same_vocabulary(teacher, path, student, student_tokenizer)
        teachers.append(teacher)
    if len(teachers) == 1:
        return teachers[0]
    return TeacherMixture(teachers, weights, glue.temperature, paths).eval()


def first_layer_map(glue, n_first: int):
    """The first teacher's ``(student, teacher)`` layer pairs: ``--layer_map``, else ``--student_layers``; None."""
    from distill.models.layers import parse_layer_map, parse_layers

    if glue.layer_map is not None:
        return parse_layer_map(glue.layer_map)
    if glue.student_layers:
        return [(i, t) for i, t in enumerate(parse_layers(glue.student_layers, n_first, "teacher"), start=1)]
    return None


def mixture_objective(weights: dict, glue, student, mixture: TeacherMixture) -> TeacherMix:
    """The teacher terms ``weights`` of one stage over every teacher of ``mixture``: one task-stage
    :class:`distill.objective.plan.Objective` per teacher (the first through the run's layer map, another through
    it scaled to its depth; a wider one through its own learned projection), mixed as distill-train mixes them.
    A teacher its terms do not fit is refused in one line that names it."""
    from distill.models.loading import num_layers
    from distill.objective.plan import Objective
    from distill.objective.settings import task_values

    n_first = num_layers(mixture.teachers[0].config)
    first = first_layer_map(glue, n_first)
    objectives = []
    for k, (path, teacher) in enumerate(zip(mixture.paths, mixture.teachers)):
        fields = {**task_values(glue), "student_layers": glue.student_layers}
        if k:
            n = num_layers(teacher.config)
            fields.update(student_layers=None, layer_map=scaled_layer_map(first, n_first, n) if first else None)
        try:
            objectives.append(Objective.from_config(weights, **fields, student_config=student, teacher_config=teacher,
                                                    projection=True, sequence_level=True))
        except UsageError as err:
            raise UsageError(f"--teacher {path!r} (teacher {k + 1}): {err}") from None
    return TeacherMix(objectives, mixture.mix, mixture.paths)
