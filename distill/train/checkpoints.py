"""Checkpoints of a distillation run: what is saved to continue exactly, and the checks before resuming.

A checkpoint is one folder per saved step, ``<output_dir>/checkpoints/step-<8 digits>/``:

- ``state.pt``: the step module (student and projections), optimiser, scheduler, precision state
  (loss scaler, fp32 masters), every rank's RNG states and the run's counters; tensors and plain
  values only, so it loads with ``torch.load(weights_only=True)`` and loading it never runs code;
- ``manifest.json``: what the folder holds (each file's size and sha256), the step and the version.

It is built in a temp folder beside the others, each file synced to disk, then renamed into place
and the parent folder synced: a crash or a SIGKILL leaves the old checkpoints and at most a temp
folder, never a renamed folder with empty files. ``--resume`` takes the newest checkpoint whose
files match its manifest; a torn or truncated newer one is reported in one line and skipped. A write
that fails for lack of space (or a file-size limit) ends the run with one line and
:data:`distill.train.signals.EXIT_NO_SPACE`; the previous checkpoints are left as they were.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distill import __version__
from distill.common.errors import UsageError
from distill.common.io import atomic_write_json
from distill.settings.config import RESUME_FIELDS, DistillConfig
from distill.train.distributed import Dist
from distill.train.signals import EXIT_NO_SPACE, end_run

CHECKPOINTS = "checkpoints"
STATE, MANIFEST = "state.pt", "manifest.json"
# written when a signal stopped the run (a job script under torchrun, whose own status says nothing of its
# workers', tests for it to requeue); removed when the run resumes
STOP_RECORD = "stopped.json"
PREFIX = "step-"
# the errors that mean "the disk (or a quota, or a file-size limit) has no room for this"
NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EFBIG: "file too large for this process's file-size limit"}


@dataclass
class RunStats:
    skipped: int = 0
    tokens: int = 0
    last_terms: dict | None = None


# --- RNG states as tensors and plain values (what weights_only=True loads) --------------------

def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(mt), gauss],
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded onto a GPU brings this tensor there too
    if "cuda" in state and torch.cuda.is_available():  # a machine with fewer GPUs than the saving one: theirs
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]][:torch.cuda.device_count()])


# --- finding and verifying ---------------------------------------------------------------------

def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Every checkpoint folder in ``out``, oldest first (temp folders and old single-file ones excluded)."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit())


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_checkpoint(path: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256, else what is wrong."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is missing or unreadable"
    for name, want in files.items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        try:  # a disk that fails a read (EIO) or a file this user cannot read: damaged too, not a crash
            size = file.stat().st_size
            if size != want["size"]:
                return f"{name} has {size} bytes, its manifest says {want['size']}"
            if file_digest(file) != want["sha256"]:
                return f"{name} does not match its manifest's sha256"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
    return None


_CHECKED: dict = {}  # (path, size, mtime) of state.pt -> check_checkpoint's answer: hash each file once
_REPORTED: set = set()  # (path, problem) already reported: one line per damaged checkpoint


def _checked(path: Path) -> str | None:
    try:
        st = (Path(path) / STATE).stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = (str(path), None, None)
    if key not in _CHECKED:
        _CHECKED[key] = check_checkpoint(path)
    return _CHECKED[key]


def latest_checkpoint(out: Path, report: bool = True) -> Path | None:
    """The newest checkpoint in ``out`` that matches its manifest (None if there is none).

    A newer one that does not is reported in one line (``report``, on the main process, once) and skipped.
    """
    main = int(os.environ.get("RANK", "0")) == 0
    found = list_checkpoints(out)
    for path in reversed(found):
        problem = _checked(path)
        if problem is None:
            return path
        if report and main and (str(path), problem) not in _REPORTED:
            _REPORTED.add((str(path), problem))
            older = [p for p in found if p < path and _checked(p) is None]
            then = f"resuming from {older[-1].name}" if older else "no older checkpoint is whole"
            print(f"warning: checkpoint {path} is damaged ({problem}): {then}", file=sys.stderr)
    legacy = sorted((Path(out) / CHECKPOINTS).glob(f"{PREFIX}*.pt"))
    if report and main and legacy and not found:
        print(f"note: {legacy[-1]} is a single-file checkpoint of an older version (a pickle, no manifest); it is "
              "not loaded, since loading it could run code: start the run again, or from its student", file=sys.stderr)
    return None


# --- writing -------------------------------------------------------------------------------------

class _HashingWriter:
    """A file object for torch.save that hashes and counts what it writes and keeps the OSError it met
    (torch.save turns a failed write into a RuntimeError that no longer says why)."""

    def __init__(self, f):
        self.f, self.sha, self.size, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.sha.update(memoryview(data)[:n])
        self.size += n
        return n

    def flush(self) -> None:
        self.f.flush()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write) -> dict:
    """Write a file with ``write(file_object)``, sync it; its size and sha256."""
    with open(path, "wb") as f:
        w = _HashingWriter(f)
        try:
            write(w)
            f.flush()
            os.fsync(f.fileno())
        except RuntimeError:
            if w.error is not None:
                raise w.error from None
            raise
    return {"size": w.size, "sha256": w.sha.hexdigest()}


def write_checkpoint(folder: Path, state: dict, step: int) -> Path:
    """``state`` as checkpoint ``step`` in ``folder``: temp folder, files synced, rename, parent synced."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(f".{PREFIX}*.tmp-*"):  # a save cut short by SIGKILL or a crash
        shutil.rmtree(leftover, ignore_errors=True)
    final = folder / f"{PREFIX}{step:08d}"
    if final.is_dir() and check_checkpoint(final) is None:
        # this step saved again (the non-finite stop right after a save): the whole one stays, RNG states and all
        return final
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{final.name}.tmp-"))
    aside = None
    try:
        files = {STATE: _write_synced(tmp / STATE, lambda f: torch.save(state, f))}
        manifest = {"step": step, "version": __version__, "world": state.get("world", 1), "files": files}
        text = (json.dumps(manifest, indent=2) + "\n").encode()
        _write_synced(tmp / MANIFEST, lambda f: f.write(text))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a checkpoint folder reads like any other
        fsync_dir(tmp)
        if final.exists():  # a damaged copy of this step: set aside (a temp name), replaced, then removed
            aside = Path(tempfile.mkdtemp(dir=folder, prefix=f".{final.name}.tmp-"))
            os.replace(final, aside / final.name)
        os.replace(tmp, final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prune_checkpoints(folder: Path, kept: Path, limit: int) -> None:
    """Keep ``kept`` (just written and whole) and the ``limit - 1`` newest older ones; drop newer ones.

    A checkpoint newer than the one just written belongs to an attempt this run is redoing after a
    resume (the resume skipped it: it was damaged). However small ``limit``, ``kept`` stays.
    """
    found = list_checkpoints(folder.parent)
    older = [p for p in found if p < kept]
    for old in older[:max(len(older) - (max(limit, 1) - 1), 0)] + [p for p in found if p > kept]:
        shutil.rmtree(old, ignore_errors=True)


def state_bytes(obj) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it needs on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def no_room_line(err: OSError, folder: Path, step: int, needed: int) -> str:
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    whole = latest_checkpoint(folder.parent, report=False)
    kept = f"the previous checkpoint {whole.name} is intact" if whole else "no earlier checkpoint exists"
    return (f"error: could not write checkpoint step {step} to {str(folder)!r}: {NO_ROOM[err.errno]} (it needs "
            f"about {needed / 2**20:.1f} MiB; {free / 2**20:.1f} MiB free there); {kept}: make room, then rerun with "
            "--resume")


def save_checkpoint(out: Path, step: int, step_module, optimizer, scheduler, precision, stats, cfg, env: Dist):
    """Everything needed to continue exactly, written by the main process; every process returns together.

    A write that fails for lack of room ends every process with one line and ``EXIT_NO_SPACE``.
    """
    rng = [None] * env.world
    if env.world > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    folder, failed = Path(out) / CHECKPOINTS, None
    if env.main:
        state = {
            "step": step, "model": step_module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "precision": precision.state_dict(), "rng": rng,
            "stats": {"skipped": stats.skipped, "tokens": stats.tokens}, "config": cfg.to_dict(),
            "version": __version__, "world": env.world,
        }
        try:
            kept = write_checkpoint(folder, state, step)
            prune_checkpoints(folder, kept, cfg.save_total_limit)
        except OSError as err:
            if err.errno not in NO_ROOM:
                raise
            failed = no_room_line(err, folder, step, state_bytes(state))
    if env.world > 1:  # every process learns whether the write held, so all end together or none does
        flag = torch.tensor([int(failed is not None)], device=env.device)
        dist.broadcast(flag, src=0)
        if int(flag):
            failed = failed or "error: the main process could not write the checkpoint (its line says why)"
    if failed:
        end_run(failed, EXIT_NO_SPACE, main=env.main)


def record_stop(out: Path, step: int, signal_name: str, status: int, env: Dist) -> None:
    if env.main:
        atomic_write_json(Path(out) / CHECKPOINTS / STOP_RECORD,
                          {"signal": signal_name, "step": step, "checkpoint": str(checkpoint_dir(out, step)),
                           "exit_status": status})


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


def load_state(path: Path, device="cpu") -> dict:
    """A checkpoint's state, read with ``weights_only=True``: tensors and plain values, never code."""
    return torch.load(Path(path) / STATE, map_location=device, weights_only=True)


def load_checkpoint(path: Path, step_module, optimizer, scheduler, precision, env: Dist, cfg: DistillConfig | None = None):
    state = load_state(path, env.device)
    if cfg is not None:  # the checkpoint's own recipe, not only the folder's distill_config.json
        before, now = state.get("config") or {}, cfg.to_dict()
        changed = next((name for name in RESUME_FIELDS if name in before and before[name] != now[name]), None)
        if changed:
            raise UsageError(
                f"--resume: checkpoint {str(path)!r} was written with {changed}={json.dumps(before[changed])}, this "
                f"run has {json.dumps(now[changed])}: it belongs to another run; resume that run's recipe, or start "
                "a new run in another folder")
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
        (Path(path).parent / STOP_RECORD).unlink(missing_ok=True)  # this run goes on: it is no longer stopped
        print(f"resumed from {path} at step {state['step']}", file=sys.stderr)
    return state["step"], stats
