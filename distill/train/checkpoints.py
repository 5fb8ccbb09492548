"""Checkpoints of a distillation run: what is saved to continue exactly, and the checks before resuming.

A checkpoint is one file per saved step in ``<output_dir>/checkpoints/``: the step module (student and
projections), optimiser, scheduler, precision state (loss scaler, fp32 masters), every rank's RNG states
and the run's counters, written atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distill import __version__
from distill.common.errors import UsageError
from distill.settings.config import RESUME_FIELDS, DistillConfig
from distill.train.distributed import Dist

CHECKPOINTS = "checkpoints"


@dataclass
class RunStats:
    skipped: int = 0
    tokens: int = 0
    last_terms: dict | None = None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out: Path) -> Path | None:
    folder = Path(out) / CHECKPOINTS
    found = sorted(folder.glob("step-*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def save_checkpoint(out: Path, step: int, step_module, optimizer, scheduler, precision, stats, cfg, env: Dist):
    """Everything needed to continue exactly, in one file written atomically (temp + rename)."""
    rng = [None] * env.world
    if env.world > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    if not env.main:
        return
    folder = Path(out) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step, "model": step_module.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "precision": precision.state_dict(), "rng": rng,
        "stats": {"skipped": stats.skipped, "tokens": stats.tokens}, "config": cfg.to_dict(), "version": __version__,
        "world": env.world,
    }
    path = folder / f"step-{step:08d}.pt"
    tmp = folder / f".{path.name}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("step-*.pt"))[:-max(cfg.save_total_limit, 1)]:
        old.unlink()


def check_resume_config(cfg: DistillConfig, out: Path) -> None:
    """--resume continues exactly only with the recipe the run started with: refuse a changed one."""
    recorded = out / "distill_config.json"
    if not recorded.exists():
        return
    before = json.loads(recorded.read_text())
    now = cfg.to_dict()
    for name in RESUME_FIELDS:
        if name in before and before[name] != now[name]:
            raise UsageError(
                f"--resume with {name}={json.dumps(now[name])} but the run in {str(out)!r} started with "
                f"{json.dumps(before[name])}: resume with the same recipe (its distill_config.json), or start a new run")


def load_checkpoint(path: Path, step_module, optimizer, scheduler, precision, env: Dist):
    state = torch.load(path, map_location=env.device, weights_only=False)
    if state.get("world", env.world) != env.world:
        raise UsageError(
            f"--resume on {env.world} processes but {path} was written by a run on {state['world']}: the data "
            "each step sees depends on the process count; resume with the same torchrun --nproc_per_node")
    step_module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    precision.load_state_dict(state["precision"])
    rngs = state["rng"]
    set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
    stats = RunStats(skipped=state["stats"]["skipped"], tokens=state["stats"]["tokens"])
    if env.main:
        print(f"resumed from {path} at step {state['step']}", file=sys.stderr)
    return state["step"], stats
