"""One process or many (torchrun): the ranks, the device, and what the ranks must agree on."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from distill.common.errors import UsageError

# buffers (position ids) are equal on every rank: no need to broadcast them each forward
# (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Read torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for but no CUDA GPU is visible: use --device cpu")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def all_finite(values: torch.Tensor, env: Dist) -> bool:
    """True when every process's losses are finite (all processes stop together, or none does)."""
    bad = (~torch.isfinite(values)).any().float()
    if env.world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)
