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

A ``dynaslice run`` directory holds ``stage1/`` (a training run), ``routes-recalibrated.safetensors``,
one Stage-II run per target (``gate-tX/``), ``eval/``, ``export/``, ``latency.json``,
``report.md``/``report.json``/``plots/``, ``pipeline.yaml`` (its settings) and ``done/`` (a marker
per finished step). Code asks this module for paths instead of spelling names out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

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
    """The checkpoint that ``checkpoints/latest`` names, or None when there is no pointer."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text().strip()


def is_finished(run_dir: str | Path) -> bool:
    """Whether the end of training wrote everything it writes (``final_eval.json`` comes last)."""
    return (Path(run_dir) / FINAL_EVAL).is_file()


def done_marker(run_dir: str | Path, step: str) -> Path:
    """The marker a ``dynaslice run`` step writes when it has finished."""
    return Path(run_dir) / DONE / f"{step}.json"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock (it is training or running into it)."""


@contextlib.contextmanager
def exclusive(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock (``RUN/.lock``) for the block.

    An OS file lock (``flock``): released when the process exits, also on SIGKILL, so a killed run
    never leaves a stale lock behind. A second writer gets :class:`RunDirBusy` at once instead of
    interleaving its checkpoints and metrics with the first one's. The lock is per process: a
    nested ``exclusive`` on the same directory from the same process is not supported.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text().strip() or "another process"
        os.close(fd)
        raise RunDirBusy(
            f"{run_dir} is in use by {holder}: wait for it to finish, or choose another --out directory"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
