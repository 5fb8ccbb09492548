"""Several teachers as one: their weights, the mixture of their soft targets, and the objective over all of them.

The soft-target terms (``ce``, ``kl``) read the weighted mixture of the teachers' tempered distributions,
``sum_k w_k softmax(z_k / T)``, through logits whose tempered softmax *is* that mixture:

    z_mix = T * log( sum_k w_k softmax(z_k / T) )      so that  softmax(z_mix / T) = sum_k w_k softmax(z_k / T),

computed in log space (``logsumexp`` of ``log w_k + log_softmax(z_k / T)``) so it stays finite. glue-eval's
task stage (``glue_eval.teachers``) and distill-train share this one copy. Representation terms (hidden
states, attentions, relations, sentence terms) have no distribution to mix: :class:`TeacherMix` takes each
teacher's own term value, through that teacher's own layer map, and sums them with the same weights.

``--teacher_weights entropy`` weighs the teachers per example (glue-eval: per sequence; distill-train: per
token row of the masked-LM head) by ``softmax_k(-H_k)``, ``H_k`` teacher k's entropy there: the surer one
weighs more. Representation terms have no entropy of their own; under ``entropy`` they take equal weights.
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import torch
from torch import Tensor, nn

from distill.common.errors import UsageError
from distill.models.loading import Features
from distill.models.vocab_head import DeferredLogits
from distill.objective.terms import TERMS

CONFIDENCE = "entropy"  # --teacher_weights entropy: per example, softmax over the teachers of minus their entropy


def parse_teacher_weights(text, n: int, *, allow_zero: bool = False) -> list[float] | str:
    """``--teacher_weights`` for ``n`` teachers: ``"0.7,0.3"`` normalised to sum to 1, equal when ``text`` is
    empty, or :data:`CONFIDENCE`. ``allow_zero``: a teacher may weigh 0 (it then takes no part), not all of
    them. One :class:`UsageError` line for a bad value."""
    if not text:
        return [1 / n] * n
    if text == CONFIDENCE:
        return CONFIDENCE
    try:
        weights = [float(w) for w in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--teacher_weights {text!r}: give one number per teacher, e.g. 0.7,0.3, or entropy") from None
    low_ok = (lambda w: w >= 0) if allow_zero else (lambda w: w > 0)
    if len(weights) != n or not all(math.isfinite(w) and low_ok(w) for w in weights) or not sum(weights) > 0:
        bound = ">= 0 (not all 0)" if allow_zero else "> 0"
        raise UsageError(f"--teacher_weights {text!r}: give {n} numbers {bound}, one per --teacher in the same order, "
                         "e.g. 0.7,0.3")
    return [w / sum(weights) for w in weights]


def vocabulary_mismatch(path: str, rows: int, own: int) -> UsageError:
    return UsageError(f"--teacher {path!r} and the student have different vocabularies ({rows} vs {own} tokens): "
                      "both read the same token ids, so they need the same tokenizer")


def check_same_vocabulary(teacher, path: str, student, student_tokenizer=None) -> None:
    """A teacher reads the student's token ids: same embedding rows, and the same tokenizer where it has one."""
    rows, own = teacher.get_input_embeddings().num_embeddings, student.get_input_embeddings().num_embeddings
    if rows != own:
        raise vocabulary_mismatch(path, rows, own)
    if student_tokenizer is not None and os.path.isdir(path):
        from transformers import AutoTokenizer

        from distill.data.corpus import check_same_tokenizer

        try:
            own_tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            return  # a teacher folder without tokenizer files: the embedding rows are what can be checked
        check_same_tokenizer(own_tokenizer, student_tokenizer, (f"teacher {path}", "student"))


def confidence_weights(logits: list[Tensor]) -> Tensor:
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


def mix_logits(logits: list[Tensor], weights: Tensor, temperature: float) -> Tensor:
    """Logits whose softmax at ``temperature`` is the ``weights``-mixture of the teachers' (last dim); a
    one-output head: the weighted mean of the outputs. ``weights``: ``[K]``, or ``[B, K]`` per example (a gate's;
    a zero weight, as top-1 gives, leaves that teacher out)."""
    stacked = torch.stack(logits)  # [teachers, ..., classes]
    weights = weights.to(stacked.device) if isinstance(weights, Tensor) else torch.tensor(
        weights, dtype=torch.float32, device=stacked.device)
    if weights.dim() == 2:  # per example ([B, K], a gate's): teacher k's weight for row b
        w = weights.t().reshape(*weights.t().shape, *([1] * (stacked.dim() - 2)))
    else:
        w = weights.view(-1, *([1] * (stacked.dim() - 1)))
    if stacked.shape[-1] == 1:
        return (w * stacked).sum(0)
    log_p = torch.log_softmax(stacked / temperature, dim=-1)
    return temperature * torch.logsumexp(torch.log(w) + log_p, dim=0)


class MixedLogits(DeferredLogits):
    """The teachers' vocabulary-head rows mixed (:func:`mix_logits`) only when asked for: row slices for the
    chunked head (:mod:`distill.models.vocab_head`), or all rows at once. ``parts``: each teacher's logits, a
    ``[N, vocab]`` tensor or a :class:`DeferredLogits`; ``weights``: ``[K]`` or :data:`CONFIDENCE` (per row)."""

    def __init__(self, parts: list, weights, temperature: float):  # noqa: the dataclass fields are not used
        self.parts, self.weights, self.temperature = list(parts), weights, float(temperature)

    @property
    def shape(self) -> torch.Size:
        return self.parts[0].shape

    def cast(self) -> list:
        return [p.cast() if isinstance(p, DeferredLogits) else None for p in self.parts]

    def rows(self, rows: slice | None = None, cast: list | None = None) -> Tensor:
        cast = self.cast() if cast is None else cast
        z = [(p.rows(rows, c) if isinstance(p, DeferredLogits) else p if rows is None else p[rows]).float()
             for p, c in zip(self.parts, cast)]
        return mix_logits(z, confidence_weights(z) if self.weights == CONFIDENCE else self.weights, self.temperature)

    def materialize(self) -> Tensor:
        return self.rows()

    def __getitem__(self, rows: slice) -> Tensor:
        return self.rows(rows)


def scaled_layer_map(pairs, n_first: int, n_teacher: int) -> list[list[int]]:
    """The first teacher's ``(student, teacher)`` layer pairs for a teacher of ``n_teacher`` layers: each teacher
    layer scaled by ``n_teacher / n_first`` and rounded (0, the embeddings, stays 0; a transformer layer stays
    >= 1), so BERT-base's 1,5,8,12 becomes 2,10,16,24 of a 24-layer teacher. The same pairs at the same depth."""
    out = []
    for s, t in pairs:
        out.append([s, t if n_teacher == n_first or t == 0 else max(1, min(n_teacher, round(t * n_teacher / n_first)))])
    return out


class TeacherMix(nn.Module):
    """Several teachers' objectives as one: ``objectives[k]`` is an :class:`distill.objective.plan.Objective`
    built against teacher k (its layer map, its projections). Soft-target logit terms run once, in the first
    objective, on :class:`MixedLogits` of every teacher's head; every other term is ``sum_k w_k term_k``.

    Called like an Objective, with a list of teacher Features (one per objective, in order)."""

    def __init__(self, objectives: list, weights, paths: list[str]):
        super().__init__()
        self.objectives = nn.ModuleList(objectives)
        self.mix = weights  # [K] summing to 1, or CONFIDENCE
        self.paths = list(paths)
        k = len(objectives)
        self.term_weights_per_teacher = [1 / k] * k if weights == CONFIDENCE else list(weights)

    @property
    def first(self):
        return self.objectives[0]

    @property
    def weights(self) -> dict:
        return self.first.weights

    @weights.setter
    def weights(self, value: dict) -> None:  # calibration takes the terms one at a time
        for objective in self.objectives:
            objective.weights = dict(value)

    @property
    def gradient_scale(self):
        return self.first.gradient_scale

    @gradient_scale.setter
    def gradient_scale(self, value) -> None:
        for objective in self.objectives:
            objective.gradient_scale = value

    def __getattr__(self, name):  # what the loop reads of the student's side: the first objective's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("objectives")[0], name)

    def extract_kwargs(self, batch: Mapping, role: str, teacher: int = 0) -> dict:
        return self.objectives[teacher if role == "teacher" else 0].extract_kwargs(batch, role)

    def describe(self) -> str:
        """E.g. ``"5*ce(T=2) on the mixture 0.7,0.3 of 2 teachers + 0.7 x teacher 1: 1*hid_mse[s1=t1] + 0.3 x ..."``."""
        mix = "entropy" if self.mix == CONFIDENCE else ",".join(f"{w:.3g}" for w in self.mix)
        logit = [n for n in self.weights if TERMS[n].feature == "logits"]
        mixed = [n for n in logit if TERMS[n].teacher]
        each = [n for n in self.weights if n not in logit]
        parts = [f"{self.first.describe(mixed)} on the mixture {mix} of {len(self.objectives)} teachers"] if mixed else []
        parts += [self.first.describe(own)] if (own := [n for n in logit if n not in mixed]) else []
        parts += [f"{w:.3g} x teacher {k + 1}: {o.describe(each)}" for k, (o, w) in
                  enumerate(zip(self.objectives, self.term_weights_per_teacher)) if each]
        return " + ".join(parts)

    def to_dict(self) -> dict:
        teachers = [{"teacher": p, "weight": w, "layer_map": o.to_dict().get("layer_map")}
                    for p, w, o in zip(self.paths, self.term_weights_per_teacher, self.objectives)]
        return {**self.first.to_dict(), "teachers": teachers, "teacher_weights": self.mix}

    def forward(self, student: Features, teachers: list[Features], batch: Mapping):
        names = list(self.weights)
        mixed = [n for n in names if TERMS[n].feature == "logits"]
        each = [n for n in names if n not in mixed]
        total, terms = None, {}
        if mixed:
            target = Features()
            if any(TERMS[n].teacher for n in mixed):
                target.logits = MixedLogits([t.logits for t in teachers], self.mix, self.first.temperature)
            total, terms = self.first.weighted(student, target, batch, mixed)
        for objective, features, w in zip(self.objectives, teachers, self.term_weights_per_teacher):
            if not each or w == 0:
                continue
            part_total, part = objective.weighted(student, features, batch, each)
            total = w * part_total if total is None else total + w * part_total
            for name in each:
                terms[name] = w * part[name] if name not in terms else terms[name] + w * part[name]
        return total, {name: terms[name] for name in names}
