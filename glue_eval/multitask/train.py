"""The multi-task loop, one screen: pick the step's kind (hybrid schedule), take one task's batch or a
meta-batch, forward, loss (the task's own, or with its teacher's soft targets), backward (plain sum or PCGrad),
clip, step, log. Then every task's dev splits.

Under DDP (``torchrun``, a process group initialised by the caller), every rank draws the same tasks (same
seed), reads its own shard of each task's rows, and gradients are averaged explicitly: one all-reduce of the
whole gradient after a plain step, or each task's gradient before PCGrad's projection (:mod:`.pcgrad`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from distill.models.loading import Features

from ..metrics import compute_metrics, task_score
from ..tasks import Task
from .combine import soft_and_hard, weighted_sum
from .config import MultitaskConfig
from .model import MultitaskModel, task_loss
from .pcgrad import all_reduce_mean_, distributed_pcgrad, mean_over_ranks
from .qa import SPAN_COLUMNS, evaluate_span_task, span_run_loss
from .sampling import HybridSchedule, TaskSampler

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class TaskRun:
    """One task's part of the run. train: tokenized rows (``input_ids`` ..., ``label``, ``row``); dev: split ->
    tokenized rows. soft / hard: the teacher's objectives (:func:`glue_eval.distillation.stage_objectives`)
    and cache (:class:`glue_eval.teacher_cache.TeacherCache`, logits per row), or None for the task loss.
    An extractive-QA task (:mod:`glue_eval.multitask.qa`): train and dev hold windows (train with
    ``start_positions``/``end_positions``), ``examples`` each dev split's questions, ``decoding`` the n-best
    settings; its soft terms and cache are the span ones (:mod:`glue_eval.qa_distill`)."""

    task: Task
    weight: float
    train: object
    dev: dict
    soft: object = None
    hard: object = None
    cache: object = None
    examples: dict | None = None
    decoding: dict | None = None

    @property
    def name(self) -> str:
        return self.task.name


class BatchStream:
    """Endless seeded batches of one task: a new permutation per pass, this rank's share of it."""

    def __init__(self, dataset, batch_size: int, collate, seed: int, rank: int = 0, world: int = 1):
        columns = [c for c in (*INPUTS, "label", *SPAN_COLUMNS, "row") if c in dataset.column_names]
        self.rows = dataset.select_columns(columns)
        self.batch_size, self.collate, self.rank, self.world = batch_size, collate, rank, world
        self.rng = np.random.default_rng(seed)
        self.order, self.position = [], 0
        self.per_epoch = math.ceil(len(dataset) / (batch_size * world))

    def next(self) -> dict:
        if self.position >= len(self.order):
            order = self.rng.permutation(len(self.rows))
            if self.world > 1:  # padded from its start to full batches on every rank (DistributedSampler's way):
                # the ranks' shares are then equally long, so they reshuffle together and never read one row twice
                order = np.resize(order, self.per_epoch * self.batch_size * self.world)
            self.order = order[self.rank::self.world]
            self.position = 0
        chosen = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.collate([self.rows[int(i)] for i in chosen])


@dataclass
class TrainRecord:
    steps: int
    kinds: dict
    loss: float
    runtime_s: float
    switched_at: int | None
    logs: list = field(default_factory=list)
    # PCGrad: the (task i, task j) pairs looked at and the projections made (conflicts); None without PCGrad
    pcgrad: dict | None = None


def total_steps(config: MultitaskConfig, streams: list[BatchStream], epochs: float, max_steps: int) -> int:
    """``max_steps`` if set; else an epoch is one pass over every task's batches (``sum_k ceil(n_k / B)``),
    K times fewer steps in ``sum`` mode, where each step takes a batch of every task."""
    if max_steps > 0:
        return max_steps
    batches = sum(s.per_epoch for s in streams)
    per_step = len(streams) if config.schedule.mode == "sum" else 1
    return max(1, math.ceil(epochs * batches / per_step))


def run_loss(model: MultitaskModel, run: TaskRun, batch: dict, device) -> tuple[torch.Tensor, dict]:
    """(loss, unweighted terms) of one task's batch: its own loss, or its teacher's objective."""
    batch = {k: v.to(device) for k, v in batch.items()}
    if run.task.is_qa:
        return span_run_loss(model, run, batch)
    out = model(task=run.name, **{k: batch[k] for k in INPUTS if k in batch})
    labels = batch["labels"]
    if run.soft is None and run.hard is None:
        loss = task_loss(out.logits, labels, run.task.num_labels)
        return loss, {"task": loss.detach()}
    plain = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    return soft_and_hard(run, Features(logits=out.logits),
                         lambda: run.cache.features(batch["row"], batch["attention_mask"]), plain)


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _set_flat_grad(params, flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over the ranks in one all-reduce (nothing on one process). Only
    parameters that have a gradient: the heads of tasks absent from the step keep none, so AdamW leaves them
    be (every rank drew the same tasks, so every rank holds the same set)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    params = [p for p in params if p.grad is not None]
    _set_flat_grad(params, all_reduce_mean_(_flat_grad(params)))


def pcgrad_backward(model: MultitaskModel, losses: dict, weights: dict, generator, tally: dict | None = None) -> None:
    """Each task's weighted loss backward alone; the encoder's gradients projected (PCGrad, over the ranks'
    averaged gradients), the heads' left as their own task made them (and averaged over the ranks)."""
    shared = [p for p in model.encoder.parameters() if p.requires_grad]
    per_task, reached = [], set()
    for name, loss in losses.items():
        (float(weights[name]) * loss).backward()
        reached |= {i for i, p in enumerate(shared) if p.grad is not None}
        per_task.append(_flat_grad(shared).float())
        for p in shared:
            p.grad = None
    _set_flat_grad(shared, distributed_pcgrad(torch.stack(per_task), generator, tally))
    for i, p in enumerate(shared):  # what no task reaches (e.g. the pooler) keeps no gradient, as in a sum step:
        if i not in reached:  # AdamW then leaves it be instead of decaying it on PCGrad steps only
            p.grad = None
    average_gradients(model.heads.parameters())


def train_step(model, runs, streams, kind: str, task: int | None, config, device, generator, autocast,
               tally: dict | None = None):
    """One optimisation step's forward and backward (the caller steps the optimiser). Returns the loss (a
    per-task step: that task's; a meta-batch: the weighted sum) and the terms of each task, by task. ``tally``:
    PCGrad's pairs and conflicts are counted into it."""
    chosen = [task] if kind == "per_task" else range(len(runs))
    losses, terms = {}, {}
    with autocast():
        for k in chosen:
            losses[runs[k].name], terms[runs[k].name] = run_loss(model, runs[k], streams[k].next(), device)
    weights = {r.name: (r.weight if kind == "sum" else 1.0) for r in runs}
    if kind == "sum" and config.gradient == "pcgrad":
        pcgrad_backward(model, losses, weights, generator, tally)
        total = weighted_sum({k: v.detach() for k, v in losses.items()}, weights)
    else:
        total = weighted_sum(losses, weights)
        total.backward()
        average_gradients(model.parameters())
    return float(total.detach()), terms


def optimiser(model: MultitaskModel, args, steps: int):
    """AdamW with TrainingArguments' settings (no decay on biases and LayerNorm) and its warm-up schedule."""
    from transformers import get_scheduler

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                            eps=args.adam_epsilon)
    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    return opt, get_scheduler(kind, opt, num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps)


def autocast_for(args, device):
    if not args.bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def terms_over_ranks(terms: dict, device) -> dict:
    """Each task's logged terms averaged over the ranks in one all-reduce (every rank took the same tasks and
    terms this step): rank 0 logs the global batch's values, not its own shard's."""
    keys = [(t, k) for t, ts in sorted(terms.items()) for k in sorted(ts)]
    values = all_reduce_mean_(torch.tensor([float(terms[t][k]) for t, k in keys], dtype=torch.float64,
                                           device=device)).tolist()
    out: dict = {t: {} for t in terms}
    for (t, k), v in zip(keys, values):
        out[t][k] = v
    return out


def streams_and_sampler(runs: list[TaskRun], config: MultitaskConfig, batch_size: int, collate, seed: int,
                        rank: int = 0, world: int = 1) -> tuple[list[BatchStream], TaskSampler]:
    """Each task's batch stream and the task sampler, each with its own random stream spawned from ``seed``
    (numpy's SeedSequence): the sampler's draws and a task's row order never repeat one another, and the
    same seed gives the same run on every rank."""
    seeds = np.random.SeedSequence(seed).spawn(len(runs) + 1)
    streams = [BatchStream(r.train, batch_size, collate, seeds[1 + k], rank, world) for k, r in enumerate(runs)]
    return streams, TaskSampler([len(r.train) for r in runs], config.sampling, seeds[0])


def train_multitask(model: MultitaskModel, runs: list[TaskRun], config: MultitaskConfig, args, collate,
                    rank: int = 0, world: int = 1, log=print) -> TrainRecord:
    """Train ``model`` on ``runs`` as ``config`` says, with ``args`` (TrainingArguments: learning rate, batch,
    epochs or max_steps, warm-up, weight decay, clipping, seed, bf16, logging_steps)."""
    device = args.device
    model.to(device).train()
    streams, sampler = streams_and_sampler(runs, config, args.per_device_train_batch_size, collate, args.seed,
                                           rank, world)
    steps = total_steps(config, streams, args.num_train_epochs, args.max_steps)
    opt, scheduler = optimiser(model, args, steps)
    schedule, generator = HybridSchedule(config.schedule), torch.Generator().manual_seed(args.seed)
    autocast, kinds, window, logs = autocast_for(args, device), {"sum": 0, "per_task": 0}, [], []
    start, loss = time.time(), float("nan")
    tally = {"pairs": 0, "conflicts": 0} if config.gradient == "pcgrad" else None
    for step in range(1, steps + 1):
        kind = schedule.next_kind()
        task = sampler.draw((step - 1) / steps) if kind == "per_task" else None
        loss, terms = train_step(model, runs, streams, kind, task, config, device, generator, autocast, tally)
        loss = mean_over_ranks(loss, device) if world > 1 else loss  # the global batch's: one switch for all ranks
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        schedule.observe(kind, loss)
        kinds[kind] += 1
        window.append(loss)
        if step % max(1, int(args.logging_steps)) == 0 or step == steps:
            terms = terms_over_ranks(terms, device) if world > 1 else terms  # the global batch's, as the loss is
            entry = {"step": step, "loss": round(sum(window) / len(window), 5), "kind": kind,
                     "lr": scheduler.get_last_lr()[0],
                     "terms": {t: {k: round(float(v), 5) for k, v in ts.items()} for t, ts in terms.items()}}
            logs.append(entry)
            window.clear()
            if rank == 0:
                log(f"step {step}/{steps} {kind} loss {entry['loss']:.4f} lr {entry['lr']:.2e}"
                    + (f" pcgrad conflicts {tally['conflicts']}/{tally['pairs']}" if tally else ""))
    return TrainRecord(steps=steps, kinds=kinds, loss=loss, runtime_s=round(time.time() - start, 2),
                       switched_at=schedule.switched_at, logs=logs,
                       pcgrad=None if tally is None else {**tally, "rate": tally["conflicts"] / max(1, tally["pairs"])})


@torch.no_grad()
def evaluate_tasks(model: MultitaskModel, runs: list[TaskRun], collate, batch_size: int, device) -> dict:
    """Task -> ``{"dev": {split: metrics}, "score_by_split", "score"}`` (fractions; the task's score is the mean
    over its splits of the mean of its metrics, as for single-task runs; an extractive-QA task's: EM/F1 per split,
    its selection split's mean of the two, and ``predictions``, :func:`glue_eval.multitask.qa.evaluate_span_task`)."""
    model.to(device).eval()
    out = {}
    for run in runs:
        if run.task.is_qa:
            out[run.name] = evaluate_span_task(model, run, collate, batch_size, device)
            continue
        dev = {}
        for split, ds in run.dev.items():
            rows = ds.select_columns([c for c in (*INPUTS, "label") if c in ds.column_names])
            logits, labels = [], []
            for start in range(0, len(rows), batch_size):
                batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
                inputs = {k: batch[k].to(device) for k in INPUTS if k in batch}
                logits.append(model(task=run.name, **inputs).logits.float().cpu())
                labels.append(batch["labels"])
            dev[split] = compute_metrics(run.task, torch.cat(logits).numpy(), torch.cat(labels).numpy())
        scores = {split: task_score(m) for split, m in dev.items()}
        out[run.name] = {"dev": dev, "score_by_split": scores, "score": float(np.mean(list(scores.values())))}
    model.train()
    return out
