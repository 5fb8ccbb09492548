"""Atomic writes: a reader never sees a half-written file or folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from distill.common.errors import UsageError


def default_file_mode() -> int:
    """0666 less the process umask: the mode ``open(path, "w")`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; a result file should read like any other
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | os.PathLike, what: str, hint: str = "") -> dict:
    """A JSON file that must hold an object; one clear UsageError for a missing file, bad JSON or a non-object."""
    path = str(path)
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} does not exist{': ' + hint if hint else ''}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise UsageError(f"{what} {path!r} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path!r} must hold a JSON object")
    return data


def check_output_dir(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> None:
    """An existing non-empty output folder is refused unless ``overwrite``.

    The folder's own lock file (held by this process while it writes there) does not count as content.
    """
    from distill.common.locks import LOCK_NAME

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {str(path)!r} exists and is a file: give a folder path")
    if path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()) and not overwrite:
        raise UsageError(
            f"output folder {str(path)!r} exists and is not empty: choose another folder or pass {flag}"
        )


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` in one rename.

    On any error the temp folder is removed and ``path`` is left as it was. A folder that a live
    run holds (its lock file) is never replaced.
    """
    from distill.common.locks import check_unlocked

    path = Path(path)
    check_output_dir(path, overwrite)
    check_unlocked(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
