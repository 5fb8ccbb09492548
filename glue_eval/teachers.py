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

import math
import os

import torch
from torch import nn
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

from distill.common.errors import UsageError
from distill.objective import terms

PAD_LOGIT = -1e9  # a padded position of a span head: no mass in any teacher's distribution
CONFIDENCE = "entropy"  # --teacher_weights entropy: per example, softmax over the teachers of minus their entropy


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
    if not glue.teacher_weights:
        return [1 / len(paths)] * len(paths)
    if glue.teacher_weights == CONFIDENCE:
        return CONFIDENCE
    try:
        weights = [float(w) for w in str(glue.teacher_weights).split(",")]
    except ValueError:
        raise UsageError(f"--teacher_weights {glue.teacher_weights!r}: give one number per teacher, e.g. 0.7,0.3") from None
    if len(weights) != len(paths) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise UsageError(f"--teacher_weights {glue.teacher_weights!r}: give {len(paths)} numbers > 0, one per --teacher "
                         "in the same order, e.g. 0.7,0.3")
    return [w / sum(weights) for w in weights]


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


def check_same_vocabulary(teacher, path: str, student, student_tokenizer=None) -> None:
    """A teacher reads the student's token ids: same embedding rows, and the same tokenizer where it has one."""
    rows, own = teacher.get_input_embeddings().num_embeddings, student.get_input_embeddings().num_embeddings
    if rows != own:
        raise UsageError(f"--teacher {path!r} and the student have different vocabularies ({rows} vs {own} tokens): "
                         "both read the same token ids, so they need the same tokenizer")
    if student_tokenizer is not None and os.path.isdir(path):
        from transformers import AutoTokenizer

        from distill.data.corpus import check_same_tokenizer

        try:
            own_tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            return  # a teacher folder without tokenizer files: the embedding rows are what can be checked
        check_same_tokenizer(own_tokenizer, student_tokenizer, (f"teacher {path}", "student"))


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


def confidence_weights(logits: list[torch.Tensor]) -> torch.Tensor:
    """``[B, K]`` per-example weights: ``softmax_k(-H_k)``, ``H_k`` the entropy (nats, T = 1) of teacher k's
    distribution on the example (a span head: the mean of its start and end entropies); the surer teacher weighs
    more. A one-output head has no distribution: equal weights."""
    z = torch.stack(logits).float()  # [K, B, ...classes]
    if z.shape[-1] == 1:
        return torch.full((z.shape[1], z.shape[0]), 1 / z.shape[0], device=z.device)
    log_p = torch.log_softmax(z, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)  # [K, B] or [K, B, 2]
    entropy = entropy.reshape(entropy.shape[0], entropy.shape[1], -1).mean(-1)
    return torch.softmax(-entropy, dim=0).t()


def mix_logits(logits: list[torch.Tensor], weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits whose softmax at ``temperature`` is the ``weights``-mixture of the teachers' (last dim); a
    one-output head: the weighted mean of the outputs. ``weights``: ``[K]``, or ``[B, K]`` per example (a gate's;
    a zero weight, as top-1 gives, leaves that teacher out)."""
    stacked = torch.stack(logits)  # [teachers, ..., classes]
    weights = weights.to(stacked.device)
    if weights.dim() == 2:  # per example ([B, K], a gate's): teacher k's weight for row b
        w = weights.t().reshape(*weights.t().shape, *([1] * (stacked.dim() - 2)))
    else:
        w = weights.view(-1, *([1] * (stacked.dim() - 1)))
    if stacked.shape[-1] == 1:
        return (w * stacked).sum(0)
    log_p = torch.log_softmax(stacked / temperature, dim=-1)
    return temperature * torch.logsumexp(torch.log(w) + log_p, dim=0)


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
