"""The GLUE ``Trainer`` subclasses: plain fine-tuning, and fine-tuning with teacher terms (TinyBERT's task stage).

This module imports neither :mod:`glue_eval.finetune` nor :mod:`glue_eval.distillation`:
both build on it. Features come from :func:`distill.models.loading.extract`, the one adaptor the
pre-training engine uses too, so the task stage reads models exactly as ``distill-train`` does.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from distill.models.frozen import prepare_teacher
from distill.models.groups import batch_groups, extract_in_groups
from distill.models.loading import Features
from distill.objective.mixture import TeacherMix
from distill.train.signals import EXIT_STOPPED, StopRequest, end_run

# Batch columns the distillation trainer reads itself; the model never sees them.
ROW, LABELLED = "row", "labelled"

# the batch columns that run along the sequence (a length group trims them to its longest row)
SEQUENCE_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

# SIGTERM, SIGINT, SIGUSR1 (distill/train/signals.py): a grid installs it, a trainer arms it while it trains
STOP = StopRequest(armed=False)


class StopOnSignal(TrainerCallback):
    """After each optimiser step, every rank agreeing: on a signal, stop training (and checkpoint if ``save``)."""

    def __init__(self, save: bool):
        self.save = save

    def on_step_end(self, args, state, control, **kwargs):
        if STOP.requested(args.world_size, args.device):
            control.should_save = control.should_save or self.save
            control.should_training_stop = True
        return control


def whole_checkpoint(folder: str) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that a save finished (``trainer_state.json`` is written last)."""
    found = [p for p in glob.glob(os.path.join(folder, "checkpoint-*"))
             if p.rsplit("-", 1)[1].isdigit() and os.path.isfile(os.path.join(p, "trainer_state.json"))]
    return max(found, key=lambda p: int(p.rsplit("-", 1)[1])) if found else None


class GlueTrainer(Trainer):
    """``Trainer`` told that the loss it gets is a per-batch mean.

    transformers 5 skips dividing the loss by the gradient-accumulation steps for every model whose forward
    takes ``**kwargs`` (BERT's does), assuming the model normalised by ``num_items_in_batch``, and multiplies it
    by the process count under torchrun; the sequence-classification heads do neither, so without this
    ``--gradient_accumulation_steps 2`` doubles the loss and the gradient, and so do 2 processes (and that
    changes what ``--max_grad_norm`` clips).
    """

    loss_is_scaled_for_ga = False
    # a stopped cell resumes from its checkpoint; the teacher stages share one folder, so a stopped one restarts
    resumable = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A sequence head returns a per-process mean whatever num_items_in_batch says; told that the model takes
        # loss kwargs (BERT's forward has **kwargs), Trainer would also multiply that mean by the process count
        # under torchrun, scaling the gradients (and what max_grad_norm clips) by it.
        self.model_accepts_loss_kwargs = False
        self.add_callback(StopOnSignal(save=self.resumable))

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``, resuming from the cell's newest checkpoint; a signal during training ends the process
        (exit 75) with a checkpoint. One that comes once the last step is done lets the cell finish: the grid
        records it, then stops (:func:`stop_after_cell`)."""
        if resume_from_checkpoint is None and self.resumable:
            resume_from_checkpoint = whole_checkpoint(self.args.output_dir)
        STOP.arm()  # stays armed through the cell's evaluation: a signal there is recorded, not fatal
        out = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        # every rank agrees (one rank may alone have got it, after the last step's check)
        if STOP.requested(self.args.world_size, self.args.device) and self.state.global_step < self.state.max_steps:
            self.stopped()
        if self.args.save_strategy == "no" and self.args.should_save:  # the checkpoints a stop left: done with
            for folder in glob.glob(os.path.join(self.args.output_dir, "checkpoint-*")):
                shutil.rmtree(folder, ignore_errors=True)
        return out

    @property
    def groups(self) -> int:
        """``--length_groups``: how many length groups a training batch runs as (1: one forward)."""
        return getattr(self.args, "length_groups", 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss; in training with ``--length_groups N`` over N length groups of the batch (see
        :mod:`distill.models.groups`): each group's mean loss weighted by its share of the rows, which is the
        batch's mean (the sequence-level heads' losses are means over rows)."""
        mask = inputs.get("attention_mask")
        found = batch_groups(mask, self.groups) if model.training and mask is not None else []
        if not found:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        total, logits = 0.0, []
        for run, rows, cols in found:
            part = {k: v[rows, :cols] if k in SEQUENCE_COLUMNS else v[rows] for k, v in inputs.items()}
            loss, out = super().compute_loss(model, part, True, None)
            total = total + loss * (len(run) / mask.shape[0])
            logits.append(out["logits"])
        if not return_outputs:
            return total
        order = torch.tensor([i for run, _, _ in found for i in run], device=mask.device)
        return total, {"logits": torch.cat(logits)[torch.argsort(order)]}

    def stopped(self):
        where = f"in {self.args.output_dir} after step {self.state.global_step}"
        if self.resumable:
            line = STOP.stopped_line(where, whole_checkpoint(self.args.output_dir), "to resume, run the same command "
                                     "(finished cells are skipped, this one goes on from its checkpoint)")
        else:
            line = (f"stopped by {STOP.name} {where}: a teacher-stage cell restarts from its beginning; run the same "
                    f"command again (exit status {EXIT_STOPPED})")
        end_run(line, EXIT_STOPPED, main=self.args.process_index == 0)


def stop_after_cell(args, cell: str) -> None:
    """Between cells: a signal that came during the last one (after its training) ends the grid now, the cell
    recorded; every rank agrees. Then, until the next cell trains, a signal ends the process at once."""
    if STOP.requested(args.world_size, args.device):
        end_run(f"stopped by {STOP.name} after cell {cell} was recorded: run the same command to go on (finished "
                f"cells are skipped) (exit status {EXIT_STOPPED})", EXIT_STOPPED, main=args.process_index == 0)
    STOP.armed = False


class DistillationTrainer(GlueTrainer):
    """``Trainer`` whose training loss is the distillation objective; evaluation stays the task loss.

    soft: an :class:`distill.objective.plan.Objective` (sequence level) of every term but ``hard_ce``; it
        counts on every training row: original, augmented and unlabelled alike.
    hard: the ``hard_ce`` objective alone; it counts only on rows whose ``labelled`` column is 1
        (original training examples), as the mean over those rows of the batch. Either may be None.
    teacher_cache: a :class:`glue_eval.teacher_cache.TeacherCache` over the training rows (their
        ``row`` column), or None to run the teacher on every batch.

    The objective's learned width projections (if any) train with the student in an extra optimiser
    group and are never saved with it. The mean of each term over a logging window is logged as
    ``distill/<term>`` (unweighted; hard_ce over the batches that held labelled rows).
    """

    resumable = False

    def __init__(self, *args, teacher, soft=None, hard=None, teacher_cache=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device)
        self.soft = soft.to(self.args.device) if soft is not None else None
        for model, objective in self.teacher_objectives():
            # this stage's teacher: eager attention only where its terms read maps, cast once
            prepare_teacher(model, objective.requests()["teacher"].attention_layers, teacher_dtype(self.args))
        self.hard = hard.to(self.args.device) if hard is not None else None
        self.teacher_cache = teacher_cache
        self._terms = defaultdict(float)
        self._term_batches = defaultdict(int)
        self.teacher_forwards = 0  # training batches the teacher ran on (0 when the cache held all it needed)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Keep the row number and the labelled flag in the batches (Trainer drops what forward does not take).
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, ROW, LABELLED]))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        extra = [p for p in self.soft.parameters() if p.requires_grad] if self.soft is not None else []
        if extra and not any(p is extra[0] for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            inputs = {k: v for k, v in inputs.items() if k not in (ROW, LABELLED)}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, terms, student = self.distillation_loss(model, inputs)
        for name, value in terms.items():
            self._terms[name] += float(value)
            self._term_batches[name] += 1
        return (loss, {"logits": student.logits}) if return_outputs else loss

    def distillation_loss(self, model, inputs) -> tuple[torch.Tensor, dict, Features]:
        """(loss, unweighted terms, student features) of one training batch.

        inputs: the collated batch: ``input_ids``, ``attention_mask`` ``[B, S]`` (maybe
        ``token_type_ids``), ``labels`` ``[B]``, and optionally ``row`` ``[B]`` (needed with a
        teacher cache) and ``labelled`` ``[B]`` (absent: every row is labelled).
        """
        ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids")
        labels = inputs["labels"]
        labelled = inputs.get(LABELLED)
        labelled = torch.ones_like(mask[:, 0], dtype=torch.bool) if labelled is None else labelled.bool()
        request = self.soft.requests()["student"] if self.soft is not None else None
        # The teacher first: its temporary activations are freed before the student's are saved for backward
        # (the other order peaked 108 MB higher in bench.peers' memory probe).
        teacher = self.teacher_features(inputs) if self.soft is not None else None
        student = extract_in_groups(model, ids, mask, groups=self.groups, token_type_ids=types,
                                    sequence_logits=True, hidden=bool(request and request.hidden),
                                    attentions=bool(request and request.attentions),
                                    value_layers=request.value_layers if request else ())
        total, terms = None, {}
        if self.soft is not None:
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            total, terms = self.soft(student, teacher, batch)
        if self.hard is not None and bool(labelled.any()):
            # Augmented and unlabelled rows carry no gold label: hard_ce sees the original examples only.
            batch = {"input_ids": ids[labelled], "attention_mask": mask[labelled], "labels": labels[labelled]}
            value, hard_terms = self.hard(Features(logits=student.logits[labelled]), Features(), batch)
            total = value if total is None else total + value
            terms = {**terms, **hard_terms}
        if total is None:  # a batch of unlabelled rows and hard_ce as the only term: nothing to learn here
            total = student.logits.sum() * 0.0
        return total, terms, student

    def teacher_objectives(self) -> list:
        """``(teacher model, its objective)`` pairs: one, or with several teachers that each take their own terms
        (``soft`` a :class:`distill.objective.mixture.TeacherMix`) one per teacher; none without ``soft``."""
        if self.soft is None:
            return []
        if isinstance(self.soft, TeacherMix):
            return list(zip(self.teacher.teachers, self.soft.objectives))
        return [(self.teacher, self.soft)]

    def teacher_features(self, inputs) -> Features | list[Features]:
        """The teacher's features for the batch (from the cache where it holds them, else one forward); with
        several teachers that each take their own terms, each teacher's, in order (the cache a list, one each)."""
        pairs = self.teacher_objectives()
        caches = self.teacher_cache if isinstance(self.teacher_cache, list) else [self.teacher_cache] * len(pairs)
        ran = [self.one_teacher_features(model, objective, cache, inputs)
               for (model, objective), cache in zip(pairs, caches, strict=True)]
        self.teacher_forwards += any(forward for _, forward in ran)  # batches on which a teacher ran
        features = [f for f, _ in ran]
        return features if isinstance(self.soft, TeacherMix) else features[0]

    def one_teacher_features(self, model, objective, cache, inputs) -> tuple[Features, bool]:
        """One teacher's features for the batch and whether it ran: from ``cache`` where it holds what
        ``objective`` reads, else one forward of ``model`` (the logits still from ``cache`` when it has them)."""
        mask = inputs["attention_mask"]
        request = objective.requests()["teacher"]
        needs_representations = bool(request.hidden or request.attentions or request.value_layers)
        if cache is not None and ROW in inputs and (cache.has_representations or not needs_representations):
            return cache.features(inputs[ROW], mask), False
        with torch.no_grad(), self._teacher_autocast():
            out = extract_in_groups(model, inputs["input_ids"], mask, groups=self.groups,
                                    token_type_ids=inputs.get("token_type_ids"), hidden=request.hidden,
                                    attentions=request.attentions, value_layers=request.value_layers,
                                    sequence_logits=True)
        if cache is not None and ROW in inputs:  # representations did not fit: the logits still come from the cache
            out.logits = cache.logits[inputs[ROW].tolist()].to(mask.device)
        return out, True

    def _teacher_autocast(self):
        # The teacher is not wrapped by accelerate, so it would run in fp32 under --bf16/--fp16.
        return teacher_autocast(self.args)

    def log(self, logs, start_time=None):
        if self._term_batches and "loss" in logs:
            logs.update({f"distill/{k}": round(v / self._term_batches[k], 5) for k, v in self._terms.items()})
            self._terms.clear()
            self._term_batches.clear()
        super().log(logs, start_time)


def teacher_dtype(args):
    """The dtype the teacher computes in for ``args`` (TrainingArguments): bf16, fp16 or None (fp32)."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


def teacher_autocast(args):
    """The autocast context the teacher runs under for ``args`` (TrainingArguments): bf16, fp16 or none."""
    dtype = teacher_dtype(args)
    return torch.autocast(args.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@dataclass
class TrainOutput:
    """What the record reads of training: steps, final loss and runtime (summed over a teacher run's stages),
    and anything the training stage adds to the record (the stages, the teacher cache, the extra rows)."""

    steps: int
    loss: float
    runtime_s: float
    examples: int
    record: dict


def train_plain(model, train, shared: dict, args: TrainingArguments):
    """Fine-tuning on the gold labels alone: the trainer and what it did."""
    trainer = GlueTrainer(model=model, args=args, train_dataset=train, **shared)
    out = trainer.train()
    return trainer, TrainOutput(out.global_step, out.training_loss, out.metrics.get("train_runtime", 0.0),
                                len(train), {})
