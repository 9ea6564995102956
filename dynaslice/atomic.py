"""Atomic file writes: a file is either the old one or the complete new one, never half-written.

Every file dynaslice writes (checkpoints, training state, JSON results, ONNX models, reports)
goes through here: write a temporary file in the destination folder, fsync it, rename it over
the destination (atomic on POSIX and Windows), fsync the folder. A crash or SIGKILL mid-write
leaves the previous file intact, which is what makes resume-after-kill safe.

The temporary file gets the permissions a plain ``open(path, "w")`` would (``0o666`` minus the
umask): ``tempfile.mkstemp`` creates it private (``0o600``), and a checkpoint that teammates on
a shared machine cannot read is a surprise nobody asked for.

The names this module makes next to ``NAME`` are ``.NAME.XXXXXXXX.tmp`` (a temporary file or
directory) and ``.NAME.old-XXXXXXXX`` (the previous directory, while :func:`atomic_dir` swaps
it). A SIGKILL can leave them behind (an exception or Ctrl-C removes them);
:func:`sweep_stale` clears them where no writer can be active (the holder of a run's lock does).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # name the file the caller asked for, not a temporary name
        raise _about(e, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename not in (None, str(tmp), name):
            raise  # about another file
        raise _about(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _about(e: OSError, path: Path) -> OSError:
    """``e`` (e.g. disk full, read-only folder) as the same kind of error about ``path``."""
    if e.errno is None:
        return e
    return type(e)(e.errno, e.strerror, str(path))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; when the block succeeds it replaces ``path``.

    For writers of several files that belong together (a checkpoint, an ONNX package): the
    directory is complete or absent. An earlier ``path`` is moved aside (``.NAME.old-XXXXXXXX``),
    the new one renamed into place, then the old one deleted (it is put back if the rename fails).
    The directory gets the permissions ``mkdir`` would give it (``mkdtemp`` makes it private).

    A kill between the two renames leaves ``path`` missing, its old version aside: the next
    ``atomic_dir`` on ``path`` (and :func:`sweep_stale`, which a run's lock runs for its
    checkpoints) renames the old version back first, so it is never lost. (Linux's
    ``renameat2(RENAME_EXCHANGE)`` would close the gap, but not on every filesystem, and the
    fallback would need this recovery anyway: one way for all.) Whatever stood at ``path``, a
    directory, a file or a symbolic link, is replaced and removed (a link, not what it points to).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _restore(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if os.path.lexists(path):
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")  # tempfile's names: 8 of [a-z0-9_]
_OLD = re.compile(r"\.(.+)\.old-[0-9a-f]{8}")


def _remove(path: Path) -> None:
    """Delete a directory tree, or a file or symbolic link (``rmtree`` refuses a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _restore(path: Path) -> None:
    """Put ``path``'s old version back if a kill left it aside with ``path`` missing."""
    if os.path.lexists(path) or not path.parent.is_dir():
        return
    olds = [p for p in path.parent.iterdir() if (m := _OLD.fullmatch(p.name)) and m.group(1) == path.name]
    if olds:
        os.replace(max(olds, key=lambda p: p.lstat().st_mtime_ns), path)
        fsync_dir(path.parent)


def sweep_stale(folder: str | os.PathLike) -> None:
    """Remove the temporaries this module's writers left in ``folder`` when they were killed,
    and put back what :func:`atomic_dir` had moved aside when it was killed between its renames.

    Only this module's names (see the module docstring) are touched, and only call this where no
    writer can be working in ``folder``: :func:`dynaslice.runs.exclusive` calls it for a run's
    folders when it takes the run's lock.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        m = _OLD.fullmatch(entry.name)
        if m is not None:
            _restore(folder / m.group(1))
        if (m is not None and os.path.lexists(entry)) or _TEMPORARY.fullmatch(entry.name):
            _remove(entry)


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
