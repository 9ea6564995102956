"""Model files: weights plus the metadata that rebuilds the network, checksummed, safe to load.

A model file is a safetensors file (``RUN/recalibrated.safetensors``, each checkpoint's
``model.safetensors``, a PSS run's ``budget.safetensors``). Its metadata key ``dynaslice`` holds
JSON: the format version, the model (registry name, keyword arguments, the gate when gated),
the training config and progress. Loading runs no code (safetensors and JSON only), and the net
is rebuilt from the registry, so ``dynaslice eval``/``export`` need nothing but the file. A
converted network (``torchvision:resnet18``, ``timm:...``) is rebuilt by converting the named
model again; one built by a ``package.module:factory`` of the user's only when the caller trusts
that name (:func:`build_model`): a file never chooses what code is imported.

Every file written since dynaslice 0.2 also carries ``dynaslice.sha256``: a SHA-256 over the
metadata and every tensor (name, dtype, shape, bytes). :func:`load_model_file` recomputes it, so
a flipped byte anywhere in the weights or metadata is reported by file name instead of silently
changing a model. Files without it (written by 0.1) load as before.

Training checkpoints (directories with the optimizer state next to a model file) are in
:mod:`dynaslice.train.checkpoint`; the names of files in a run directory in :mod:`dynaslice.runs`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from . import runs, safejson
from .atomic import atomic_write_bytes
from .gate import GatedSupernet
from .models import create_supernet
from .models.base import Supernet
from .models.named import WEIGHT_KEYWORDS, imports_code

FORMAT, VERSION = "dynaslice", 1
CHECKSUM_KEY = "dynaslice.sha256"


class CheckpointError(ValueError):
    """A model file or checkpoint is missing, damaged or not ours; the message says which and what to do."""


class UntrustedFactory(ValueError):
    """A model file names a ``package.module:factory`` the caller did not trust (see :func:`build_model`)."""


def prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every key under ``prefix.`` (``model.*``, ``ema.*`` in a model file)."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.``, with the prefix removed (the inverse of :func:`prefixed`)."""
    head = prefix + "."
    return {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}


def _digest(tensors: Mapping[str, torch.Tensor], meta_json: str) -> str:
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_file_bytes(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bytes:
    """A safetensors file with our metadata under ``dynaslice`` and its checksum."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = json.dumps({"format": FORMAT, "version": VERSION, **meta})
    return safetensors_save(flat, metadata={FORMAT: meta_json, CHECKSUM_KEY: _digest(flat, meta_json)})


def save_model_file(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Atomically write weights plus metadata (e.g. a recalibrated model) to ``path``."""
    atomic_write_bytes(path, model_file_bytes(tensors, meta))


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a model file, checksum verified, or a CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({reason}): it is truncated or damaged; "
            "use an earlier checkpoint"
        ) from None
    raw = header.get(FORMAT)
    if raw is None:
        raise CheckpointError(
            f"{path} is a safetensors file but not a dynaslice model file (no '{FORMAT}' metadata)"
        )
    expected = header.get(CHECKSUM_KEY)
    if expected is None and set(header) != {FORMAT}:  # 0.1 wrote only FORMAT: a changed key name
        raise CheckpointError(
            f"{path} is damaged: its metadata keys {sorted(header)} are not dynaslice's; "
            "use an earlier checkpoint or a clean copy of the file"
        )
    if expected is not None and _digest(tensors, raw) != expected:
        raise CheckpointError(
            f"{path} is damaged: its checksum does not match its contents (a changed byte in the "
            "weights or metadata); use an earlier checkpoint or a clean copy of the file"
        )
    try:
        meta = safejson.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has damaged dynaslice metadata (not JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{path} has model-file format version {version!r}; this dynaslice reads version {VERSION}"
        )
    return tensors, meta


# --------------------------------------------------------------------------- nets from files


def model_spec(net: Supernet, kwargs: Mapping[str, Any], name: str) -> dict[str, Any]:
    """What rebuilds ``net``: registry ``name``, its ``kwargs`` and, when gated, the gate."""
    spec: dict[str, Any] = {"name": name, "kwargs": dict(kwargs)}
    if isinstance(net, GatedSupernet):
        spec["gate"] = net.spec()
    return spec


def build_model(spec: Mapping[str, Any], trust: Collection[str] = ()) -> Supernet:
    """The (untrained) net a model file's ``model`` metadata names: a supernet, gated if it has ``gate``.

    A converted network is rebuilt by its recorded name and keyword arguments. Names that
    import a module of their choosing (``package.module:factory``, :func:`imports_code`) are
    built only when listed in ``trust``: loading a shared file must never run code it names
    (``os:system``); ``torchvision:``/``timm:`` names and the zoo's import nothing. Nor does it
    fetch or read other weights: a converted net is rebuilt without the factory keywords that
    would (:data:`~dynaslice.models.named.WEIGHT_KEYWORDS`), since the file's tensors replace them all.
    """
    name = spec["name"]
    if not isinstance(name, str):
        raise TypeError(f"model name {name!r} is not a string")
    if imports_code(name) and name not in trust:
        raise UntrustedFactory(
            f"the model is built by {name!r}, code this file names: dynaslice imports none; if you trust "
            f"it, pass --trust-factory {name} to the command (in Python: load_supernet(path, trust=[{name!r}]))"
        )
    kwargs = dict(spec["kwargs"])
    if ":" in name:  # the file's tensors replace every weight: fetch or read no others
        kwargs = {k: v for k, v in kwargs.items() if k not in WEIGHT_KEYWORDS}
    net = create_supernet(name, **kwargs)
    gate = spec.get("gate")
    if gate:
        net = GatedSupernet(net, cut=gate["cut"], routes=gate["routes"], hidden=gate["hidden"])
    return net


def resolve_model_file(path: str | Path) -> Path:
    """The model file behind ``path``: a model file, a checkpoint directory or a run directory
    (its newest checkpoint: the one ``checkpoints/latest`` names, else the highest step)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path} not found: pass a run directory, a checkpoint directory or a model file")
    if (path / runs.MODEL_FILE).is_file():
        return path / runs.MODEL_FILE
    latest = runs.latest_pointer(path)
    if latest is not None and (latest / runs.MODEL_FILE).is_file():
        return latest / runs.MODEL_FILE
    steps = runs.checkpoint_steps(path)
    if steps:
        return steps[-1] / runs.MODEL_FILE
    raise CheckpointError(
        f"no checkpoint in {path}: pass a run directory, a checkpoint directory or a .safetensors file"
    )


def net_from_tensors(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    file: str | Path,
    weights: str = "model",
    trust: Collection[str] = (),
) -> Supernet:
    """The net of a model file already read with :func:`load_model_file` (``file`` names it in errors;
    ``trust``: see :func:`build_model`)."""
    try:
        net = build_model(meta["model"], trust)
    except UntrustedFactory as e:
        raise CheckpointError(f"{file}: {e}") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{file} does not say which model it holds (no model name/kwargs)") from None
    except ValueError as e:
        raise CheckpointError(f"{file} names a model this dynaslice cannot build: {e}") from None
    state = unprefixed(weights, tensors)
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


def load_supernet(
    path: str | Path, weights: str = "model", trust: Collection[str] = ()
) -> tuple[Supernet, dict[str, Any]]:
    """Rebuild the supernet of a model file, checkpoint or run directory (a :class:`GatedSupernet`
    for a gated run) with its ``model`` or ``ema`` weights; returns ``(net, metadata)``.

    ``trust``: ``package.module:factory`` names you allow to be imported to rebuild a converted
    network of your own (:func:`build_model`); a file naming any other is refused.
    """
    file = resolve_model_file(path)
    tensors, meta = load_model_file(file)
    return net_from_tensors(tensors, meta, file, weights, trust), meta
