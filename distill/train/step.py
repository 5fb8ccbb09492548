"""One micro-batch's forward and loss, as one module (so DDP sees one forward), and what its optimiser sees."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from distill.models.loading import Features, extract

class StudentStep(nn.Module):
    """Student (+ objective projections) forward and loss for one micro-batch.

    Wrapped in DistributedDataParallel as a whole, so the projections' gradients are
    synchronised too. The teacher is held outside the module tree (frozen, never
    synchronised) and runs under ``no_grad``. ``generator``: an ELECTRA generator that
    trains (:class:`distill.train.electra.GeneratorStep`): it corrupts the batch here, and its
    MLM loss (term ``gen_mlm``) joins the total, so DDP, the optimiser and checkpoints see it.
    """

    def __init__(self, student: nn.Module, objective: nn.Module, teacher: nn.Module, generator=None,
                 teacher_fp32: bool = False):
        super().__init__()
        self.teacher_fp32 = teacher_fp32  # the teacher's forward outside autocast (distill-train --teacher_fp32)
        self.student = student
        self.objective = objective
        self.generator = generator
        # a tuple keeps them out of parameters(), state_dict() and DDP; several teachers: a list, one per objective
        # of the objective's TeacherMix (distill.objective.mixture)
        self._teacher = tuple(teacher) if isinstance(teacher, (list, tuple)) else (teacher,)
        self._several = isinstance(teacher, (list, tuple))

    def teacher_features(self, batch: dict):
        """What the teacher(s) give for ``batch``, under ``no_grad``: one Features, or a list for several."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if not self.objective.needs_teacher:  # e.g. an mlm-only objective asks nothing of the teacher
            return [Features() for _ in self._teacher] if self._several else Features()
        fp32 = torch.autocast(ids.device.type, enabled=False) if self.teacher_fp32 else contextlib.nullcontext()
        with torch.no_grad(), fp32:
            if not self._several:
                return extract(self._teacher[0], ids, mask, **self.objective.extract_kwargs(batch, "teacher"))
            return [extract(t, ids, mask, **self.objective.extract_kwargs(batch, "teacher", k))
                    for k, t in enumerate(self._teacher)]

    def forward(self, batch: dict):
        gen_loss = None
        if self.generator is not None:
            batch, gen_loss = self.generator(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        teacher_out = self.teacher_features(batch)
        student_out = extract(self.student, ids, mask, **self.objective.extract_kwargs(batch, "student"))
        loss, terms = self.objective(student_out, teacher_out, batch)
        if gen_loss is not None:
            loss, terms = loss + self.generator.weight * gen_loss, {**terms, "gen_mlm": gen_loss.detach()}
        return loss, terms

    def term_values(self, batch: dict) -> dict:
        """Each active term's unweighted value, attached to the graph (``--calibrate``; no generator loss)."""
        from distill.objective.calibrate import objective_terms

        if self.generator is not None:
            with torch.no_grad():
                batch, _ = self.generator(batch, with_loss=False)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        teacher_out = self.teacher_features(batch)
        student_out = extract(self.student, ids, mask, **self.objective.extract_kwargs(batch, "student"))
        return objective_terms(self.objective, student_out, teacher_out, batch)




def freeze_unused(step_module: nn.Module, batch: dict, precision) -> list[str]:
    """Freeze parameters the objective never reaches (e.g. BERT's pooler, or a head no term uses).

    One probe forward/backward finds them. Frozen, they need no optimiser state and DDP
    can run without ``find_unused_parameters`` (a graph walk every step). The probe runs
    before the run seeds its RNGs (or loads them on resume), so it changes no result.
    """
    with precision.autocast():
        loss, _ = step_module(batch)
    loss.float().backward()
    unused = [name for name, p in step_module.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in step_module.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused


def param_groups(module: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]



