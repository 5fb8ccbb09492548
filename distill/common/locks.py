"""One writer per output folder: a lock file naming the process that writes there.

A run (``distill-train``) or a grid (``glue-eval``) holds ``<folder>/.distill.lock`` while
it writes. The file is hard-linked into place from a private copy that already holds its
record (``O_CREAT | O_EXCL`` where links are not supported), so of two processes that race for
it exactly one wins, and none reads it empty; it holds the writer's pid, host, command and start time, so the one
that loses can say who holds the folder. A second writer is refused whatever its flags
(``--overwrite_output_dir`` and ``--resume`` included): those flags are about finished
work, never about a run that is still writing.

A lock whose process is gone (same host, pid no longer alive, e.g. after a SIGKILL) is
stale: the next writer takes it over with a note. A lock from another host cannot be
checked from here, so it is refused with the way to clear it by hand.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from distill.common.errors import UsageError

LOCK_NAME = ".distill.lock"


def lock_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / LOCK_NAME


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def read_lock(path: Path, tries: int = 20) -> dict | None:
    """The holder recorded in ``path``; None when the file is gone.

    The lock appears with its record in it; only where hard links are not supported is it written right after
    the exclusive create, so a reader may catch it empty for an instant: it reads again for up to ~1 s before
    calling the record unreadable.
    """
    for attempt in range(tries):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            if isinstance(record, dict) and "pid" in record:
                return record
        except json.JSONDecodeError:
            pass
        if attempt < tries - 1:
            time.sleep(0.05)
    return {"pid": -1, "host": "?", "command": "an unreadable lock file", "started": "?"}


def describe_holder(record: dict) -> str:
    return f"{record.get('command', '?')} (pid {record.get('pid')} on {record.get('host')}, since {record.get('started')})"


def _is_stale(record: dict) -> bool:
    return record.get("host") == _host() and isinstance(record.get("pid"), int) and not _alive(record["pid"])


def check_unlocked(folder: str | os.PathLike) -> None:
    """Refuse (UsageError) when a live process holds ``folder``'s lock; a stale lock is no obstacle."""
    path = lock_path(folder)
    record = read_lock(path) if path.exists() else None
    if record is not None and not _is_stale(record) and record.get("pid") != os.getpid():
        raise _busy(folder, record)


def _busy(folder, record: dict) -> UsageError:
    fix = "wait for it to finish or choose another folder"
    if record.get("host") != _host():
        fix += f"; if that run is gone, delete {str(lock_path(folder))!r}"
    return UsageError(f"output folder {str(folder)!r} is in use by {describe_holder(record)}: {fix}")


class OutputLock:
    """Context manager: hold ``folder``'s lock for the ``with`` block (``enabled=False``: a no-op).

    The folder (and missing parents) are created to hold the lock; those that are still empty
    when the lock is released are removed again, so a run refused for bad input leaves nothing.
    """

    def __init__(self, folder: str | os.PathLike, command: str, enabled: bool = True):
        self.folder = Path(folder)
        self.command = command
        self.enabled = enabled
        self.created: list[Path] = []
        self.record: dict | None = None
        self.nested = False  # this process already holds the folder (e.g. a study running grids): nothing to do

    def __enter__(self):
        if not self.enabled:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"output {str(self.folder)!r} exists and is a file: give a folder path")
        missing = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.created = missing  # deepest first
        try:
            self._acquire()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _acquire(self) -> None:
        path = lock_path(self.folder)
        self.record = {"pid": os.getpid(), "host": _host(), "command": self.command,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):  # a stale lock moved away may be retaken by a third process: look again
            try:
                self._create(path)
            except FileExistsError:
                holder = read_lock(path)
                if holder is None:  # released between our create and our read
                    continue
                if holder.get("pid") == os.getpid() and holder.get("host") == _host():
                    self.nested = True
                    return
                if not _is_stale(holder):
                    raise _busy(self.folder, holder) from None
                if self._take_over(path, holder):
                    print(f"note: took over the stale lock on {str(self.folder)!r} left by "
                          f"{describe_holder(holder)}: that process is gone", file=sys.stderr)
                continue
            return
        raise UsageError(f"output folder {str(self.folder)!r}: could not take its lock (other processes keep "
                         "taking it): try again")

    def _create(self, path: Path) -> None:
        """Create ``path`` holding this process's record, or raise FileExistsError. The record is written to a
        private file first and hard-linked into place (atomic, and it fails if the lock exists), so no other
        process ever reads the lock empty; where hard links are not supported, ``O_EXCL`` then the write."""
        text = json.dumps(self.record) + "\n"

        def write(f) -> None:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

        private = path.with_name(f"{LOCK_NAME}.new-{os.getpid()}")
        try:
            with open(private, "w", encoding="utf-8") as f:
                write(f)
            try:
                os.link(private, path)
                return
            except FileExistsError:
                raise
            except OSError:  # no hard links here (some network or FAT file systems)
                pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(private)
        with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w", encoding="utf-8") as f:
            write(f)

    @staticmethod
    def _take_over(path: Path, holder: dict) -> bool:
        """Move a stale lock aside; False if what was moved turned out to be someone's fresh lock (put back)."""
        aside = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        moved = read_lock(aside, tries=1)
        if moved is not None and moved.get("pid") != holder.get("pid") and not _is_stale(moved):
            # another process took the stale lock over between our read and our rename: give it back
            with contextlib.suppress(OSError):
                os.rename(aside, path)
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
        return True

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        path = lock_path(self.folder)
        current = read_lock(path, tries=1) if path.exists() and not self.nested else None
        if current is not None and current.get("pid") == os.getpid() and current.get("host") == _host():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._remove_created()
        return False

    def _remove_created(self) -> None:
        for p in self.created:  # deepest first; stop at the first that holds something
            try:
                p.rmdir()
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    break
                if not isinstance(err, FileNotFoundError):
                    break
        self.created = []


def output_lock(folder: str | os.PathLike, command: str, enabled: bool = True) -> OutputLock:
    """``with output_lock(out, "distill-train"):`` hold ``out`` while writing there."""
    return OutputLock(folder, command, enabled)


__all__ = ["LOCK_NAME", "OutputLock", "check_unlocked", "lock_path", "output_lock", "read_lock"]
