"""Training checkpoints: atomic on disk, checksummed, safe to load, resumable from the newest intact one.

A checkpoint is a directory ``RUN/checkpoints/step-N`` (names in :mod:`dynaslice.runs`) holding

- ``model.safetensors``: the weights (``model.*``, and ``ema.*`` for IB/IEB) with metadata that
  rebuilds the net (:mod:`dynaslice.modelfile`), checksummed;
- ``state.pt``: optimizer, scheduler, sampler and progress: only plain containers, numbers and
  tensors, read with ``torch.load(weights_only=True)``, so no code runs on load. Its SHA-256 is
  recorded in the model file's metadata (``state_sha256``) and checked on resume.

A checkpoint is written into a temporary directory that is renamed into place, then
``checkpoints/latest`` is replaced atomically: a run killed at any moment leaves the previous
checkpoint intact, and nothing half-written is ever picked up. What a killed writer left (its
temporaries; a step being saved again, moved aside) is swept or put back when the run's lock is
taken next (:func:`dynaslice.runs.exclusive`), before anything is read. On resume,
:func:`load_resumable` takes the checkpoint ``latest`` names (or, without ``latest``, the highest
step); a damaged one is reported by name, renamed ``damaged-step-N`` and the previous intact one
is used instead. A run with checkpoint directories never silently restarts from step 0.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import runs
from ..atomic import atomic_dir, atomic_path, atomic_write_bytes
from ..modelfile import CheckpointError, load_model_file, model_file_bytes

STATE_FORMAT, STATE_VERSION = "dynaslice-train-state", 1


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` of plain data (``weights_only``-loadable), atomically."""
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, tmp)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state(path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """The training state saved by :func:`save_state`, loaded with ``weights_only=True``.

    ``sha256``: the checksum recorded next to it; a mismatch means the file was damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} not found: this checkpoint cannot be resumed")
    if sha256 is not None and file_sha256(path) != sha256:
        raise CheckpointError(f"{path} is damaged: its checksum does not match the one recorded at save time")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises an unsafe load: we never do that
        raise CheckpointError(
            f"{path} is not a dynaslice training state: it holds Python objects that only a "
            "code-running (unsafe) load could read, and dynaslice never loads files that way"
        ) from None
    except Exception as e:  # zip and EOF errors: a truncated or overwritten file
        raise CheckpointError(
            f"{path} is truncated or damaged ({type(e).__name__}); use an earlier checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a dynaslice training state")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path} has training-state version {state.get('version')}; expected {STATE_VERSION}"
        )
    return state


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``RUN/checkpoints/step-N`` atomically, point ``latest`` at it, prune older ones."""
    root = runs.checkpoints_dir(run_dir)
    name = runs.checkpoint_name(step)
    # a step saved again (e.g. after Stage II's calibration) replaces its directory whole
    with atomic_dir(root / name) as tmp:
        save_state(tmp / runs.STATE_FILE, {**state, "step": step})
        meta = {**meta, "step": step, "state_sha256": file_sha256(tmp / runs.STATE_FILE)}
        atomic_write_bytes(tmp / runs.MODEL_FILE, model_file_bytes(tensors, meta))
    atomic_write_bytes(root / runs.LATEST, name.encode())
    older = [p for p in runs.checkpoint_steps(run_dir) if p.name < name]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


@dataclass
class Checkpoint:
    """A checkpoint read back in full: its directory, weights, metadata and training state."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    state: dict[str, Any]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify one checkpoint directory (model file and state checksums)."""
    path = Path(path)
    tensors, meta = load_model_file(path / runs.MODEL_FILE)
    state = load_state(path / runs.STATE_FILE, meta.get("state_sha256"))
    return Checkpoint(path, tensors, meta, state)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint directory of a run (``latest``, else the highest step), or None.

    Does not verify it; :func:`load_resumable` does.
    """
    pointer = runs.latest_pointer(run_dir)
    if pointer is not None and (pointer / runs.MODEL_FILE).is_file():
        return pointer
    steps = runs.checkpoint_steps(run_dir)
    return steps[-1] if steps else None


def refuse_existing_run(run_dir: str | Path, resume: bool) -> None:
    """The one rule of every trainer: a run directory that already holds a checkpoint is
    continued only when asked (``resume``), never trained over."""
    existing = None if resume or not Path(run_dir).is_dir() else latest_checkpoint(run_dir)
    if existing is not None:
        raise CheckpointError(
            f"{run_dir} already holds a checkpoint ({existing.name}): pass --resume to continue it, "
            "or choose another --out directory"
        )


def load_resumable(run_dir: str | Path, log: Any = print) -> Checkpoint | None:
    """The newest intact checkpoint of a run, or None if it has no checkpoint at all.

    Candidates are tried newest first (the one ``latest`` names leads). A damaged one is
    reported through ``log``, renamed ``damaged-step-N`` (kept for inspection, never pruned into
    or resumed from again) and the previous one is tried. If every checkpoint is damaged, a
    CheckpointError names them: a run never restarts from scratch over its own checkpoints.
    """
    steps = runs.checkpoint_steps(run_dir)
    pointer = runs.latest_pointer(run_dir)
    if pointer is not None and pointer in steps:
        steps = [p for p in steps if p.name <= pointer.name]
    elif steps:
        log(f"note: {runs.checkpoints_dir(run_dir) / runs.LATEST} is missing or names no checkpoint; "
            f"using the highest step found")  # fmt: skip
    damaged = []
    for path in reversed(steps):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            aside = path.with_name(f"damaged-{path.name}")
            os.replace(path, aside)
            damaged.append(f"{path.name}: {e}")
            log(f"warning: checkpoint {path} is damaged ({e}); moved to {aside.name}, trying the previous one")
            continue
        if damaged:
            atomic_write_bytes(runs.checkpoints_dir(run_dir) / runs.LATEST, path.name.encode())
        return ckpt
    if damaged:
        raise CheckpointError(f"every checkpoint of {run_dir} is damaged: " + "; ".join(damaged))
    return None
