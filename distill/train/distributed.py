"""One process or many (torchrun): the ranks, the device, and what the ranks must agree on."""

from __future__ import annotations

import inspect
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from distill.common.errors import UsageError
from distill.train.signals import EXIT_PEER_LOST, end_run

# buffers (position ids) are equal on every rank: no need to broadcast them each forward
# (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})

# How long a collective waits for the other ranks before it fails. A rank that dies is noticed at once
# (gloo sees its connection close, torchrun sees the process end); this bounds the wait for one that hangs.
# Long enough for what the others legitimately wait on: rank 0 tokenising a corpus into the cache (the
# others wait at a barrier), or writing a large checkpoint. DISTILL_PG_TIMEOUT_S overrides it.
PROCESS_GROUP_TIMEOUT_S = 1800
TIMEOUT_ENV = "DISTILL_PG_TIMEOUT_S"


def process_group_timeout() -> timedelta:
    value = os.environ.get(TIMEOUT_ENV, str(PROCESS_GROUP_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UsageError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds: e.g. {TIMEOUT_ENV}=600")
    return timedelta(seconds=seconds)


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
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=process_group_timeout())
    return Dist(rank, world, local_rank, dev)


def all_finite(values: torch.Tensor, env: Dist) -> bool:
    """True when every process's losses are finite (all processes stop together, or none does)."""
    bad = (~torch.isfinite(values)).any().float()
    if env.world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank died, hung or cut its connection."""
    if isinstance(err, (dist.DistBackendError, dist.DistNetworkError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        needle in text for needle in ("Connection reset by peer", "Connection closed by peer", "Timed out waiting",
                                      "timed out", "gloo/transport", "NCCL communicator was aborted"))


@contextmanager
def peers_watched():
    """Under torchrun: a collective that fails because another rank died or hung ends this rank with one line
    and ``EXIT_PEER_LOST`` instead of a traceback (torchrun's summary then names the rank that failed first)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    try:
        yield
    except RuntimeError as err:
        if world <= 1 or not lost_peer(err):
            raise
        # gloo's first sentence, without its source-file prefix: "Read error [10.0.0.2]:8077: Connection reset by peer"
        first = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0]).split(". ")[0] if str(err).strip() \
            else type(err).__name__
        end_run(f"error: rank {rank} of {world} lost contact with another rank in a collective ({first[:300]}): a "
                f"rank died or stalled past the process-group timeout ({process_group_timeout().total_seconds():g} "
                f"s, {TIMEOUT_ENV}); torchrun's summary names it; rerun with --resume", EXIT_PEER_LOST)
