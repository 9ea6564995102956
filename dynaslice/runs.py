"""The layout of run directories: every file and folder name dynaslice writes, in one place.

A training run (``dynaslice train``)::

    RUN/config.yaml               the resolved config
    RUN/metrics.jsonl             one JSON object per logged step / evaluation
    RUN/checkpoints/step-N/       model.safetensors (weights + metadata), state.pt (training state)
    RUN/checkpoints/latest        the name of the newest complete checkpoint
    RUN/recalibrated.safetensors  the final weights, BN recalibrated for the evaluated subnets
    RUN/final_eval.json           the final validation rows; written last: the run is finished
    RUN/budget_table.json, RUN/budget.safetensors   PSS runs: the budget table and its weights
    RUN/static-xW/                static counterparts (``train.static_widths``), one run each
    RUN/phase1/                   the first phase of a run that trains its largest network first

A pruning run (``dynaslice prune``) holds up to three training runs, ``base/``, ``train/`` and
``finetune/``, then the compact network (``model.pt``, ``model.onnx``) and ``final_eval.json``.

A ``dynaslice run`` directory holds ``stage1/`` (a training run), ``routes-recalibrated.safetensors``,
one Stage-II run per target (``gate-tX/``), ``eval/``, ``export/``, ``latency.json``,
``report.md``/``report.json``/``plots/``, ``pipeline.yaml`` (its settings) and ``done/`` (a marker
per finished step). Code asks this module for paths instead of spelling names out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .atomic import sweep_stale

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
RECALIBRATED = "recalibrated.safetensors"
FINAL_EVAL = "final_eval.json"
BUDGET_TABLE = "budget_table.json"
BUDGET_WEIGHTS = "budget.safetensors"
LOCK = ".lock"
PHASE1 = "phase1"

# dynaslice prune: RUN/base (the full network trained before pruning), RUN/train (the method's
# own training: DCFF, White-Box's masks, scratch), RUN/finetune (the pruned network), then the
# compact network RUN/model.pt and RUN/model.onnx, and RUN/final_eval.json last
PRUNE_BASE = "base"
PRUNE_TRAIN = "train"
PRUNE_FINETUNE = "finetune"
PRUNED_MODEL = "model.pt"
PRUNED_ONNX = "model.onnx"

# dynaslice run
PIPELINE = "pipeline.yaml"
STAGE1 = "stage1"
ROUTES_RECALIBRATED = "routes-recalibrated.safetensors"
EVAL = "eval"
EXPORT = "export"
LATENCY = "latency.json"
DONE = "done"


def static_name(width: float) -> str:
    """``static-x0.5``: the sub-directory of the static counterpart of one width."""
    return f"static-x{width:g}"


def gate_name(target: float | None) -> str:
    """``gate-t0.5``: the Stage-II run of one MACs target (``gate-sgs`` without a target)."""
    return "gate-sgs" if target is None else f"gate-t{target:g}"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_steps(run_dir: str | Path) -> list[Path]:
    """The complete-looking checkpoint directories of a run (each holds a model file), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / MODEL_FILE).is_file())


def latest_pointer(run_dir: str | Path) -> Path | None:
    """The checkpoint that ``checkpoints/latest`` names, or None when there is no pointer or
    it is damaged (not a ``step-N`` name: callers then fall back to the highest step)."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_bytes().strip()
    if not re.fullmatch(rb"step-\d+", name):
        return None
    return pointer.parent / name.decode()


def is_finished(run_dir: str | Path) -> bool:
    """Whether the end of training wrote everything it writes (``final_eval.json`` comes last)."""
    return (Path(run_dir) / FINAL_EVAL).is_file()


def done_marker(run_dir: str | Path, step: str) -> Path:
    """The marker a ``dynaslice run`` step writes when it has finished."""
    return Path(run_dir) / DONE / f"{step}.json"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock (it is training or running into it)."""


SWEPT = (".", CHECKPOINTS, EVAL, EXPORT, DONE, "plots")
"""The folders of a run that its lock holder writes in (``plots``: :mod:`dynaslice.report`'s),
swept of stale temporaries when the lock is taken; sub-runs (``stage1``, ``static-x0.5``, ...)
hold their own locks and sweep themselves."""


@dataclass
class _Lock:
    """A run directory's lock held by this process: open descriptors of the directory and of
    ``RUN/.lock``, both locked, and how many ``exclusive`` blocks of this process share it."""

    run_dir: Path
    fds: list[int]
    holders: int = 0


_HELD: dict[Path, _Lock] = {}  # locks this process holds, by resolved run directory
_TRIES = 5  # attempts to lock a lock file that another process keeps replacing
_NO_DIRECTORY_LOCKS = (errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP)


def _same_files(lock: _Lock) -> bool:
    """Whether the locked directory and lock file are still the ones at their paths."""
    try:
        now = [os.stat(lock.run_dir), os.stat(lock.run_dir / LOCK)]
    except FileNotFoundError:
        return False
    held = [os.fstat(fd) for fd in lock.fds]
    return all((a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) for a, b in zip(now, held, strict=True))


def _flock(fd: int, path: Path, run_dir: Path) -> None:
    """Lock ``fd`` or raise RunDirBusy naming the holder (its pid, from the lock file)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = (run_dir / LOCK).read_text().strip() or "another process"
        except OSError:
            holder = "another process"
        raise RunDirBusy(
            f"{run_dir} is in use by {holder}: wait for it to finish, or choose another --out directory"
        ) from None
    except OSError as e:  # NFS emulates flock with POSIX locks, which a directory cannot take
        if path != run_dir or e.errno not in _NO_DIRECTORY_LOCKS:
            raise


def _take(run_dir: Path) -> _Lock:
    """Lock ``run_dir`` itself and ``RUN/.lock``, each checked to be the file at its path once locked.

    The directory's lock is what survives ``rm RUN/.lock`` while a run trains (a second process
    would otherwise create a new lock file and lock that); the lock file's is what excludes where
    directories take no lock (NFS), and holds the holder's pid for the message of a refusal.
    Either one replaced between opening and locking (a process ending a failed start deletes
    them) means a lock on something nobody else will look at: try again.
    """
    for _ in range(_TRIES):
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _Lock(run_dir, [])
        try:
            for path in (run_dir, run_dir / LOCK):
                lock.fds.append(os.open(path, os.O_RDONLY if path == run_dir else os.O_RDWR | os.O_CREAT, 0o666))
                _flock(lock.fds[-1], path, run_dir)
            if _same_files(lock):
                os.ftruncate(lock.fds[1], 0)
                os.write(lock.fds[1], f"pid {os.getpid()}".encode())
                return lock
        except FileNotFoundError:  # the directory went between mkdir and open: a failed start cleaning up
            pass
        except BaseException:
            _close(lock)
            raise
        _close(lock)
    raise RunDirBusy(f"{run_dir}: its lock file {LOCK} keeps being replaced by another process; try again")


def _close(lock: _Lock) -> None:
    for fd in lock.fds:  # closing releases the flock
        os.close(fd)


def check_lock(run_dir: str | Path) -> None:
    """Raise RunDirBusy if the lock this process holds on ``run_dir`` is no longer the directory's.

    Deleting or replacing ``RUN/.lock`` (or the run directory) while a run holds it lets a
    second process take a new lock and write into the run too. A writer calls this before it
    writes (the trainer, before each checkpoint): a cheap ``stat``, and it stops instead of
    interleaving its files with the other process's.
    """
    lock = _HELD.get(Path(run_dir).resolve())
    if lock is None:
        raise RuntimeError(f"this process does not hold the lock of {run_dir}")  # a bug, not a user's mistake
    if not _same_files(lock):
        raise RunDirBusy(
            f"{run_dir / LOCK} was deleted or replaced while this process held it, so another process "
            f"may be writing into {run_dir}: stopped before writing more; resume (--resume) once none does"
        )


@contextlib.contextmanager
def exclusive(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock (the directory and ``RUN/.lock``) for the block.

    An OS file lock (``flock``, see :func:`_take`): released when the process exits, also on
    SIGKILL, so a killed run never leaves a stale lock behind. A second writer gets
    :class:`RunDirBusy` at once instead of interleaving its checkpoints and metrics with the first
    one's. The lock belongs to the process: blocks on the same directory in one process share it
    (a trainer resumed, then a new one for the same run), and it is released when the last of
    them ends. Taking it sweeps the temporaries that killed writers left in the run's folders
    (:data:`SWEPT`, :func:`dynaslice.atomic.sweep_stale`): holding the lock, nobody else is
    writing there. A block that fails before writing anything leaves no trace: a directory this
    call created and that holds only the lock is removed again (a refused budget or config must
    not leave an empty run behind).
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    key = run_dir.resolve()
    if key not in _HELD:
        lock = _take(run_dir)
        try:
            for folder in SWEPT:
                sweep_stale(run_dir / folder)
        except BaseException:
            _close(lock)
            raise
        _HELD[key] = lock
    _HELD[key].holders += 1
    failed = True
    try:
        yield
        failed = False
    finally:
        _HELD[key].holders -= 1
        if _HELD[key].holders == 0:
            lock = _HELD.pop(key)
            if failed and created and os.listdir(run_dir) == [LOCK]:
                (run_dir / LOCK).unlink()
                run_dir.rmdir()
            _close(lock)
