"""Checkpoints: atomic on disk, safe to load, enough to rebuild the net without the config file.

Layout of a run directory::

    RUN/config.yaml                          the resolved config
    RUN/metrics.jsonl                        one JSON object per logged step / evaluation
    RUN/checkpoints/step-00001234/model.safetensors   weights: "model.*" and (IB/IEB) "ema.*"
    RUN/checkpoints/step-00001234/state.pt            optimizer, scheduler, sampler, progress
    RUN/checkpoints/latest                   the name of the newest complete checkpoint

``model.safetensors`` carries JSON metadata (model name and kwargs, the config, the step), so
``dynaslice eval``/``recalibrate`` rebuild the supernet from it alone. ``state.pt`` holds only
plain containers, numbers and tensors and is read with ``torch.load(weights_only=True)``: no
code runs on load. A checkpoint is written into a temporary directory that is renamed into
place, then ``latest`` is replaced atomically: a run killed at any moment leaves the previous
checkpoint intact, and nothing half-written is ever picked up.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from ..atomic import atomic_path, atomic_write_bytes, fsync_dir
from ..gate import GatedSupernet
from ..models import create_supernet
from ..models.base import Supernet

FORMAT, VERSION = "dynaslice", 1
STATE_FORMAT = "dynaslice-train-state"
MODEL_FILE, STATE_FILE, LATEST = "model.safetensors", "state.pt", "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or not ours; the message says which file and what to do."""


def model_file_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """A safetensors file with our metadata under the key ``dynaslice``."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return safetensors_save(
        flat, metadata={FORMAT: json.dumps({"format": FORMAT, "version": VERSION, **meta})}
    )


def save_model_file(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write weights plus metadata (e.g. a recalibrated model) to ``path``."""
    atomic_write_bytes(path, model_file_bytes(tensors, meta))


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a model file, or a CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(FORMAT)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({reason}): it is truncated or damaged; "
            "use an earlier checkpoint"
        ) from None
    if raw is None:
        raise CheckpointError(
            f"{path} is a safetensors file but not a dynaslice checkpoint (no '{FORMAT}' metadata)"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has damaged dynaslice metadata (not JSON)") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this dynaslice reads {FORMAT!r} version {VERSION}"
        )
    return tensors, meta


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` of plain data (``weights_only``-loadable), atomically."""
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, "version": VERSION, **state}, tmp)


def load_state(path: str | Path) -> dict[str, Any]:
    """The training state saved by :func:`save_state`, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} not found: this checkpoint cannot be resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors all mean: not a usable state file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} cannot be loaded safely ({type(e).__name__}: {reason}): it is truncated, "
            "damaged or not a dynaslice training state; use an earlier checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a dynaslice training state")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has training-state version {state.get('version')}; expected {VERSION}")
    return state


# --------------------------------------------------------------------------- checkpoint directories


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``RUN/checkpoints/step-N`` atomically, point ``latest`` at it, prune old ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        atomic_write_bytes(tmp / MODEL_FILE, model_file_bytes(tensors, {**meta, "step": step}))
        save_state(tmp / STATE_FILE, {**state, "step": step})
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    atomic_write_bytes(root / LATEST, name.encode())
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[: max(0, len(done) - keep)]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # left by a run killed while writing
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None if it has none."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing: the run directory is damaged")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """The model file behind ``path``: a run directory, a checkpoint directory or a model file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest / MODEL_FILE
    raise CheckpointError(
        f"no checkpoint in {path}: pass a run directory, a checkpoint directory or a .safetensors file"
    )


def gate_spec(net: Supernet) -> dict[str, Any] | None:
    """What rebuilds ``net``'s gate (cut, routes as arch dicts, gate width), or None if ungated.

    Stored under ``model.gate`` in checkpoint metadata: routes are written out, never
    recomputed on load, so a later change to ``routes_even`` cannot change a trained gate.
    """
    if not isinstance(net, GatedSupernet):
        return None
    g = net.gate
    return {
        "cut": net.cut,
        "routes": [a.to_dict() for a in net.routes],
        "reduction": round(g.channels / g.hidden),
        "hidden": g.hidden,
    }


def build_model(spec: dict[str, Any]) -> Supernet:
    """The (untrained) net a checkpoint's ``model`` metadata names: a supernet, gated if it has ``gate``."""
    net = create_supernet(spec["name"], **spec["kwargs"])
    gate = spec.get("gate")
    if gate:
        net = GatedSupernet(net, cut=gate["cut"], routes=gate["routes"], hidden=gate["hidden"])
    return net


def load_supernet(path: str | Path, weights: str = "model") -> tuple[Supernet, dict[str, Any]]:
    """Rebuild the supernet (a :class:`GatedSupernet` for a gated run) of a checkpoint and load
    its ``model`` or ``ema`` weights."""
    file = resolve_checkpoint(path)
    tensors, meta = load_model_file(file)
    return supernet_from_tensors(tensors, meta, file, weights), meta


def supernet_from_tensors(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], file: str | Path, weights: str = "model"
) -> Supernet:
    """The supernet of a model file already read with :func:`load_model_file` (``file`` names it in errors)."""
    try:
        net = build_model(meta["model"])
    except KeyError:
        raise CheckpointError(f"{file} does not say which model it holds (no model name/kwargs)") from None
    prefix = weights + "."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        have = sorted({k.split(".")[0] for k in tensors})
        raise CheckpointError(f"{file} holds no {weights!r} weights (it has {have})")
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(
            f"{file} does not match {meta['model']['name']}: {str(e).splitlines()[-1].strip()}"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not match {meta['model']['name']}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return net
