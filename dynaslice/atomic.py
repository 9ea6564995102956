"""Atomic file writes: a file is either the old one or the complete new one, never half-written.

Every file dynaslice writes (checkpoints, training state, JSON results, ONNX models, reports)
goes through here: write a temporary file in the destination folder, fsync it, rename it over
the destination (atomic on POSIX and Windows), fsync the folder. A crash or SIGKILL mid-write
leaves the previous file intact, which is what makes resume-after-kill safe.

The temporary file gets the permissions a plain ``open(path, "w")`` would (``0o666`` minus the
umask): ``tempfile.mkstemp`` creates it private (``0o600``), and a checkpoint that teammates on
a shared machine cannot read is a surprise nobody asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it replaces ``path``.

    For writers that want a file name (``torch.save``, ``onnx.save``). If the block raises, the
    temporary file is removed and ``path`` is untouched. Creates the parent folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; when the block succeeds it replaces ``path``.

    For writers of several files that belong together (a checkpoint, an ONNX package): the
    directory is complete or absent. An earlier ``path`` is moved aside, the new one renamed into
    place, then the old one deleted (it is put back if the rename fails). The directory gets the
    permissions ``mkdir`` would give it (``mkdtemp`` makes it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """Write ``data`` as JSON (with a final newline) to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=indent) + "\n").encode())


def cached_json(path: str | os.PathLike, compute: Callable[[], Any], indent: int = 1) -> Any:
    """``compute()``'s JSON result, kept at ``path`` and reused when it exists.

    What makes a long benchmark or pipeline step resumable: a finished part is read back, an
    unfinished one recomputed; the atomic write means a kill never leaves half a result behind.
    """
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_json(path, value, indent=indent)
    return value
