"""What a run reports while it trains: the logging window (loss and terms, tokens/s) and the logger."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from distill.common.io import atomic_write_text
from distill.train.checkpoints import RunStats
from distill.train.distributed import Dist

LOGS = "logs"

class Window:
    """Sums of the loss and terms since the last log, kept on the device; one sync per step (the progress bar)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.tokens = 0
        self.tokens_since_step = 0
        self.seconds = 0.0
        self.last_loss = float("nan")
        self.tokens_per_s = 0.0
        self._last_terms: dict = {}

    def add(self, loss, terms, tokens):
        for k, v in {"loss": loss, **terms}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.count += 1
        self.tokens += tokens
        self.tokens_since_step += tokens
        self._last_terms = terms

    def last_terms(self) -> str:
        return ", ".join(f"{k}={float(v):.4g}" for k, v in self._last_terms.items())

    def step_done(self, seconds: float):
        self.seconds += seconds
        self.tokens_per_s = self.tokens_since_step / max(seconds, 1e-9)
        self.last_loss = float(self.sums["loss"] / max(self.count, 1)) if self.count else float("nan")
        self.tokens_since_step = 0

    def flush(self, env: Dist, step, lr, result, stats: RunStats) -> dict:
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        tokens = torch.tensor([float(self.tokens), self.seconds], device=values.device)
        if env.world > 1:
            dist.all_reduce(values)
            values /= env.world
            dist.all_reduce(tokens)
        record = {k: float(v) for k, v in zip(keys, values.tolist())}
        record.update(step=step, lr=lr, loss_scale=result.scale, skipped_steps=stats.skipped,
                      grad_norm=result.grad_norm, tokens_per_s=float(tokens[0]) / max(float(tokens[1]) / env.world, 1e-9),
                      tokens_seen=stats.tokens)
        stats.last_terms = {k: record[k] for k in keys}
        self.sums, self.count, self.tokens, self.seconds = {}, 0, 0, 0.0
        return record


class Logger:
    """Progress bar, TensorBoard and a JSONL file; only the main process has one."""

    def __init__(self, folder: Path, progress: bool, total: int, start: int):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        log = folder / "train_log.jsonl"
        if start and log.exists():  # a resumed run redoes the steps after its checkpoint: drop their records
            kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= start]
            atomic_write_text(log, "".join(line + "\n" for line in kept))
        # a fresh run (over an --overwrite_output_dir folder) starts its records afresh; a resumed one appends
        self.jsonl = open(log, "a" if start else "w", encoding="utf-8")
        self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=start + 1)
        self.bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True)

    def log(self, step: int, record: dict):
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, step)

    def tick(self, loss: float, tokens_per_s: float):
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()
        self.tb.close()
        self.jsonl.close()


# --- checkpoints ------------------------------------------------------------------------------


