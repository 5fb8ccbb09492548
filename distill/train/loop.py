"""The distillation loop, top to bottom: setup, data, forward, loss, backward, step, log, checkpoint.

Determinism by construction: optimiser step ``k`` uses the global batch
``order(epoch)[k*G:(k+1)*G]`` (G = per-device batch x accumulation x world size),
cut into chunks of ``per_device_batch_size``; process ``rank`` takes chunk
``micro * world + rank`` at micro-step ``micro``, and chunk ``c`` is masked with a
generator seeded from ``(seed, step, c)``. So the data a step sees depends only on the
step number: resuming needs no sampler state, and N processes see exactly what one
process sees with N times the accumulation.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from distill.common.errors import UsageError
from distill.settings.config import DistillConfig, check_config
from distill.train.checkpoints import (CHECKPOINTS, RunStats, latest_checkpoint, load_checkpoint, record_stop,
                                      save_checkpoint)
from distill.train.distributed import Dist, all_finite, peers_watched
from distill.train.logs import LOGS, Logger, Window  # noqa: F401  (LOGS: the folder, re-exported)
from distill.train.save import save_student  # noqa: F401  (re-exported: tests patch it here)
from distill.train.setup import Run, Optimisation, announce, build_run, calibrate_only, optimisation, start_process
from distill.train.signals import StopRequest, end_run, EXIT_STOPPED
from distill.train.step import StudentStep  # noqa: F401  (re-exported for callers of the old path)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); what was last good has been saved."""


def train(cfg: DistillConfig) -> str:
    """Run a distillation described by ``cfg``; return the folder holding the student.

    The main process holds the output folder's lock for the whole run: a second writer is refused.
    """
    from distill.common.locks import output_lock

    check_config(cfg)  # a config built in code gets the checks a recipe or the command line gets
    with output_lock(cfg.output_dir, "distill-train", enabled=int(os.environ.get("RANK", "0")) == 0), \
            StopRequest(armed=False) as stop, peers_watched():  # signals, dead ranks: see distill/train/signals.py
        return _train(cfg, stop)


def _train(cfg: DistillConfig, stop: StopRequest) -> str:
    env, threads, out = start_process(cfg)
    run = build_run(cfg, env)  # configs first, then teacher, student, objective, precision, batches
    if cfg.calibrate:  # measure the terms on the first steps' batches, change nothing, stop
        return calibrate_only(cfg, run, out)
    opt = optimisation(cfg, run, env)  # the step module (student + projections), AdamW, schedule, DDP
    start_step, stats = 0, RunStats()
    if cfg.resume:
        start_step, stats = load_checkpoint(latest_checkpoint(out), opt.step_module, opt.optimizer, opt.scheduler,
                                            run.precision, env, cfg)
    else:
        torch.manual_seed(cfg.seed + env.rank)  # dropout differs per process, as in any DDP run
    logger = announce(cfg, run, env, out, threads, start_step)
    window = Window()
    stop.arm()  # from here a signal stops the run after the step under way, with a checkpoint
    for step in range(start_step, run.total_steps):
        t0 = time.perf_counter()
        losses = forward_backward(cfg, run, opt, env, step, window)
        if not run.precision.scales_loss and not all_finite(torch.stack(losses), env):
            stop_on_non_finite(cfg, run, opt, env, out, step, stats, losses, window)
        result = run.precision.step(opt.optimizer, cfg.max_grad_norm)
        if not result.skipped:
            opt.scheduler.step()
        stats.skipped += int(result.skipped)
        stats.tokens += window.tokens_since_step * env.world
        window.step_done(time.perf_counter() - t0)
        done = step + 1
        log_step(cfg, run, opt, env, logger, window, stats, result, done)
        if cfg.save_steps and done % cfg.save_steps == 0 and done < run.total_steps:
            save_checkpoint(out, done, opt.step_module, opt.optimizer, opt.scheduler, run.precision, stats, cfg, env)
        if done < run.total_steps and stop.requested(env.world, env.device):  # every rank agrees, every step
            stop_after(cfg, run, opt, env, out, logger, stats, done, stop)
    finish(cfg, run, opt, env, out, logger, stats)
    return str(out)


def forward_backward(cfg: DistillConfig, run: Run, opt: Optimisation, env: Dist, step: int, window: Window) -> list:
    """The micro-batches of optimiser step ``step`` on this rank: forward, loss, backward (gradients
    all-reduced on the last one only); their losses, detached."""
    losses = []
    for micro in range(cfg.gradient_accumulation_steps):
        batch = run.batches.chunk(step, micro * env.world + env.rank)
        sync = micro == cfg.gradient_accumulation_steps - 1
        with (opt.model.no_sync() if env.world > 1 and not sync else nullcontext()):
            with run.precision.autocast():
                loss, terms = opt.model(batch)
            run.precision.backward(loss / cfg.gradient_accumulation_steps)
        losses.append(loss.detach())
        window.add(loss.detach(), terms, int(batch["attention_mask"].sum()))
    return losses


def stop_on_non_finite(cfg, run: Run, opt: Optimisation, env: Dist, out: Path, step: int, stats: RunStats,
                       losses: list, window: Window):
    """The weights are still those of the last finished step: save them, then stop with one line."""
    save_checkpoint(out, step, opt.step_module, opt.optimizer, opt.scheduler, run.precision, stats, cfg, env)
    raise TrainingError(
        f"loss is {[float(x) for x in losses]} at step {step + 1} ({window.last_terms()}): saved step {step} to "
        f"{out / CHECKPOINTS}; check the data, or lower learning_rate (or max_grad_norm) and start a new run: "
        "--resume keeps the recipe, so it would meet the same batch with the same weights")


def stop_after(cfg, run: Run, opt: Optimisation, env: Dist, out: Path, logger: Logger | None, stats: RunStats,
               done: int, stop: StopRequest):
    """A signal came: checkpoint step ``done`` (unless just saved), one line, exit ``EXIT_STOPPED`` on every rank."""
    if not (cfg.save_steps and done % cfg.save_steps == 0):
        save_checkpoint(out, done, opt.step_module, opt.optimizer, opt.scheduler, run.precision, stats, cfg, env)
    if logger:
        logger.close()
    record_stop(out, done, stop.name, EXIT_STOPPED, env)  # for job scripts under torchrun (exit status 1 there)
    line = stop.stopped_line(f"after step {done} of {run.total_steps}", out / CHECKPOINTS / f"step-{done:08d}",
                             f"to resume, run the same {'torchrun ' if env.world > 1 else ''}command with --resume")
    if env.world > 1:
        opt.model = None  # as in finish(): DDP's reducer must not outlive the process group
        dist.destroy_process_group()
    end_run(line, EXIT_STOPPED, main=env.main)


def log_step(cfg, run: Run, opt: Optimisation, env: Dist, logger: Logger | None, window: Window, stats: RunStats,
             result, done: int) -> None:
    """Every ``logging_steps``: the window's means (every rank joins their all-reduce); each step: the bar."""
    if done % cfg.logging_steps == 0 or done == run.total_steps:
        if logger:
            logger.log(done, window.flush(env, done, opt.scheduler.get_last_lr()[0], result, stats))
        elif env.world > 1:
            window.flush(env, done, opt.scheduler.get_last_lr()[0], result, stats)
    if logger:
        logger.tick(window.last_loss, window.tokens_per_s)


def finish(cfg, run: Run, opt: Optimisation, env: Dist, out: Path, logger: Logger | None, stats: RunStats) -> None:
    """The student (and a trained ELECTRA generator) saved by the main process; the process group closed."""
    from distill.common.hardware import describe_machine

    if logger:
        logger.close()
    if env.main:
        save_student(out, run.student, run.precision, run.tokenizer, cfg, run.layers, run.objective, stats,
                     run.total_steps, env, run.batches.describe(), run.pooler_start, machine=describe_machine(),
                     sentence=run.sentence, size=run.size)
        print(f"student saved to {out} (load it with from_pretrained({str(out)!r}))", file=sys.stderr)
        if run.generator is not None:
            from distill.train.electra import save_generator

            print(f"trained generator saved to {save_generator(out, run.generator, run.precision, run.tokenizer)}",
                  file=sys.stderr)
    if env.world > 1:
        # DDP's reducer must not hold the last reference to the process group: its destructor would
        # then join gloo's worker thread while holding the GIL, which that thread may need (a hang at exit)
        opt.model = None
        dist.destroy_process_group()


__all__ = ["train", "TrainingError", "UsageError", "StudentStep", "latest_checkpoint", "Dist"]
