"""Several teachers with fixed weights: ``--teacher A --teacher B --teacher_weights 0.7,0.3``.

The student learns from the weighted mixture of the teachers' soft targets. :class:`TeacherMixture` runs every
teacher and returns logits whose tempered softmax *is* that mixture,

    z_mix = T * log( sum_k w_k softmax(z_k / T) )      so that  softmax(z_mix / T) = sum_k w_k softmax(z_k / T),

computed in log space (``logsumexp`` of ``log w_k + log_softmax(z_k / T)``) so it stays finite; the soft-target
terms (``kl``, ``ce``) and the teacher cache then read it as one teacher's logits, unchanged. A one-output
(regression) head mixes its outputs by the same weights; an extractive-QA head mixes its start and its end
distributions over each window's real tokens. Weights are normalised to sum to 1 (default: equal).
Representation terms would need each teacher's own layer map: with several teachers they are refused.
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
from distill.objective.mixture import (CONFIDENCE, check_same_vocabulary, confidence_weights,  # noqa: F401
                                       mix_logits, parse_teacher_weights)

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


def check_teachers(glue, stage_weights) -> None:
    """Several teachers: each a model folder, weights that fit, and only logit terms (one line each)."""
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
    for stage in stage_weights:
        inner = [k for k, w in stage.items() if w and terms.TERMS[k].feature != "logits"]
        if inner:
            raise UsageError(f"--distill_weights: {inner[0]!r} compares one teacher's layers; with several teachers "
                             "use the logit terms (kl, ce, hard_ce) on their mixture")


class TeacherMixture(nn.Module):
    """Several frozen teachers as one: its output's logits are :func:`mix_logits` of theirs (module docstring).
    Anything else (config, layers) is the first teacher's, which only logit terms never read."""

    def __init__(self, teachers, weights, temperature: float):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.confidence = weights == CONFIDENCE  # per-example weights from each teacher's own entropy
        weights = [1 / len(teachers)] * len(teachers) if self.confidence else weights
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.temperature = float(temperature)
        self.config = teachers[0].config

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


def load_mixture(glue, load_one, student, student_tokenizer=None):
    """Every teacher (``load_one(path)`` loads and checks one) as a :class:`TeacherMixture`, checked against the
    student's vocabulary and tokenizer (the run's own, ``--tokenizer`` or the model's, unless given)."""
    if student_tokenizer is None:
        from transformers import AutoTokenizer

        student_tokenizer = AutoTokenizer.from_pretrained(glue.tokenizer or glue.model)
    teachers = []
    for path in teacher_paths(glue):
        teacher = load_one(path)
        check_same_vocabulary(teacher, path, student, student_tokenizer)
        teachers.append(teacher)
    return TeacherMixture(teachers, mixture_weights(glue), glue.temperature).eval()
