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
import fcntl
import os
import re
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


_HELD: dict[Path, list[int]] = {}  # locks this process holds: run directory -> [holders, fd]


@contextlib.contextmanager
def exclusive(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock (``RUN/.lock``) for the block.

    An OS file lock (``flock``): released when the process exits, also on SIGKILL, so a killed run
    never leaves a stale lock behind. A second writer gets :class:`RunDirBusy` at once instead of
    interleaving its checkpoints and metrics with the first one's. The lock belongs to the
    process: blocks on the same directory in one process share it (a trainer resumed, then a
    new one for the same run), and it is released when the last of them ends. A block that fails
    before writing anything leaves no trace: a directory this call created and that holds only the
    lock is removed again (a refused budget or config must not leave an empty run behind).
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key not in _HELD:
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
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        _HELD[key] = [0, fd]
    _HELD[key][0] += 1
    failed = True
    try:
        yield
        failed = False
    finally:
        _HELD[key][0] -= 1
        if _HELD[key][0] == 0:
            fd = _HELD.pop(key)[1]
            if failed and created and os.listdir(run_dir) == [LOCK]:
                (run_dir / LOCK).unlink()
                run_dir.rmdir()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
