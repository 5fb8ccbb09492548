"""Stopping on request, and the exit statuses a job script tests.

Clusters end jobs on purpose: SLURM sends SIGTERM (or the signal its ``--signal`` names, often
SIGUSR1) and SIGKILL after a grace period; Kubernetes and spot instances send SIGTERM and give
30 seconds to 2 minutes; a person at a terminal presses Ctrl-C (SIGINT). A :class:`StopRequest`
records the signal and nothing else (a handler that wrote or printed could tear what the
interrupted code was writing); the loop asks it once per optimiser step, every process agreeing in
one ``all_reduce``, and on a stop writes a checkpoint, prints one line saying where and how to
resume, and exits with :data:`EXIT_STOPPED`. A second signal while the checkpoint is written is
recorded the same way, so it cannot tear the checkpoint.

The statuses are written here and nowhere else (docs/training.md quotes them).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

# sysexits.h EX_TEMPFAIL: stopped on request after writing a checkpoint; run the same command with --resume
EXIT_STOPPED = 75
# sysexits.h EX_IOERR: a write failed for lack of space (ENOSPC, EDQUOT) or a file-size limit (EFBIG)
EXIT_NO_SPACE = 74
# sysexits.h EX_UNAVAILABLE: another process of a torchrun run died or hung (distributed.peers_watched)
EXIT_PEER_LOST = 69

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class RunEnded(SystemExit):
    """Ends the process with ``status`` once its one stderr line is printed: no traceback, and the
    ``with`` blocks it passes through (the output folder's lock) still clean up."""

    def __init__(self, status: int, line: str = ""):
        super().__init__(status)
        self.line = line


def end_run(line: str, status: int, main: bool = True):
    """Print ``line`` (on the main process only) and end the run with ``status``."""
    if main and line:
        print(line, file=sys.stderr, flush=True)
    raise RunEnded(status, line)


class StopRequest:
    """Catches ``signals`` while installed (a ``with`` block); :meth:`requested` says whether one came.

    Handlers can only be installed from the main thread; elsewhere the request is inert and the
    signals keep their previous handlers. ``armed=False``: until :meth:`arm`, a signal ends the process
    at once (a run still loading its models has nothing to checkpoint).
    """

    def __init__(self, signals=STOP_SIGNALS, armed: bool = True):
        self.signals = tuple(signals)
        self.received: int | None = None
        self.armed = self._armed_at_start = armed
        self._previous: dict = {}

    def arm(self) -> None:
        """From now on a signal is recorded and acted on at the next check; before, it ends the process at
        once (there is nothing to save yet) with :data:`EXIT_STOPPED`."""
        self.armed = True

    def _handle(self, signum, frame):
        if self.received is None:  # the first signal names the stop; later ones change nothing
            self.received = signum
        if not self.armed:
            # os.write, not print: the interrupted code may be inside a print to stderr (no reentrant call)
            os.write(2, f"stopped by {self.name} before the first step: nothing to save; run the same command "
                        f"again (exit status {EXIT_STOPPED})\n".encode())
            raise RunEnded(EXIT_STOPPED)

    def install(self) -> StopRequest:
        self.received, self.armed = None, self._armed_at_start  # used again (a second grid in one process): clean
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def requested(self, world: int = 1, device="cpu") -> bool:
        """True when any of the ``world`` processes got a signal: one ``all_reduce`` (MAX) of a flag,
        so every process stops after the same optimiser step. Call it on every process, every step."""
        if world <= 1:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else int(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.received is None and int(flag):
            self.received = int(flag)  # another process's signal: its name goes into this one's line
        return bool(int(flag))

    def stopped_line(self, where: str, checkpoint, resume: str) -> str:
        """The one line a stopped run prints: which signal, where it stopped, the checkpoint, how to resume."""
        return f"stopped by {self.name} {where}: checkpoint {checkpoint}; {resume} (exit status {EXIT_STOPPED})"
