"""Start a supernet from a trained network (``train.init_from``), and the helpers that go with it.

Slimmable training that starts from a trained full network (once-for-all's progressive
shrinking, DϵpS) beats training every width from scratch at a short budget: the largest subnet
is good from the first step, its channels can be sorted by importance
(:func:`dynaslice.ordering.reorder_channels`) so narrow slices start from the best channels, and
it is the natural frozen teacher (:class:`dynaslice.train.targets.FrozenTeacherTarget`).

:func:`init_from` loads, into the supernet's largest subnet:

- ``RUN`` of a static run (``train.static_widths``): its largest network, ``RUN/static-x1``;
- a run directory, checkpoint directory or dynaslice ``.safetensors`` model file (a supernet or a
  static network: both are stored as supernet weights); a run's ``recalibrated.safetensors``
  is preferred to its last checkpoint, for its exact BatchNorm statistics;
- a plain ``.safetensors`` state dict of the static model (torchvision module names), or a
  ``.pt``/``.pth`` one written by ``torch.save(model.state_dict(), path)`` (read with
  ``weights_only``); a network converted by ``make_supernet`` (``model.name:
  torchvision:resnet18``, ...) keeps its model's module names, so its model's own state dict fits;
- ``torchvision:<weights>`` (e.g. ``torchvision:ResNet18_Weights.IMAGENET1K_V1``) for families
  whose largest subnet *is* a torchvision model (:func:`dynaslice.load_pretrained`). torchvision
  reads them from its cache (``TORCH_HOME``) and downloads them once when they are missing.

Into a gated supernet (``model.gate.enabled``), a network trained without a gate goes into its
backbone and the new gate's attention head starts near the identity; a gated supernet's own
weights load whole. A source that does not fit the supernet is refused with one sentence naming
both.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .. import runs
from ..counting import count_params
from ..gate import GatedSupernet
from ..modelfile import FORMAT, CheckpointError, load_model_file, resolve_model_file
from ..models.base import Supernet, load_pretrained
from ..nn import SlicedBatchNorm2d

TORCHVISION = "torchvision:"
TORCH_FILES = (".pt", ".pth")
STATIC_LARGEST = runs.static_name(1.0)
RECALIBRATED = runs.RECALIBRATED


class InitSourceError(ValueError):
    """``train.init_from`` names something that is missing, unreadable or does not fit the supernet."""


def _model_file(source: Path) -> Path:
    """The model file to read for a path source (see the module docstring)."""
    if source.is_dir() and (source / STATIC_LARGEST).is_dir():
        source = source / STATIC_LARGEST
    if source.is_dir() and (source / RECALIBRATED).is_file():
        return source / RECALIBRATED
    try:
        return resolve_model_file(source)
    except CheckpointError as e:
        raise InitSourceError(f"train.init_from: {e}") from None


def _is_dynaslice_file(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return FORMAT in (f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise InitSourceError(f"train.init_from: {path} is not a readable safetensors file ({e})") from None


def _describe(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "another network"
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(spec.get("kwargs", {}).items()))
    return f"{spec.get('name')}({kwargs})"


@torch.no_grad()
def _load_supernet_state(
    net: Supernet, state: dict[str, torch.Tensor], source: str, their: dict[str, Any] | None, ours: str
) -> None:
    """Copy a supernet state dict (same architecture) into ``net``, or refuse in one sentence."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        if shapes:
            k = shapes[0]
            detail = f"{k} is {tuple(state[k].shape)} there and {tuple(own[k].shape)} here"
        elif missing:
            detail = f"{len(missing)} tensors missing, e.g. {missing[0]}"
        else:
            detail = f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}"
        raise InitSourceError(
            f"train.init_from={source} holds {_describe(their)}, which does not fit {ours} ({detail}); "
            "start from a run of the same model and model.kwargs"
        )
    for k, v in state.items():
        own[k].copy_(v)


def _torchvision_state(net: Supernet, name: str, ours: str) -> dict[str, torch.Tensor]:
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise InitSourceError(
            f"train.init_from=torchvision:{name}: unknown torchvision weights; name them like "
            "ResNet18_Weights.IMAGENET1K_V1"
        ) from None
    theirs, have = weights.meta.get("num_params"), count_params(net, net.space.largest())
    if theirs != have:  # checked before anything is downloaded
        raise InitSourceError(
            f"train.init_from=torchvision:{name} is a {theirs}-parameter model but the largest subnet of "
            f"{ours} has {have}: build the matching family (e.g. resnet18 with num_classes=1000)"
        )
    return weights.get_state_dict(progress=False, check_hash=True)


def init_from(net: Supernet, source: str | Path, model_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the trained network ``source`` into ``net`` (in place); returns what was loaded.

    ``model_spec`` (``{"name", "kwargs"}`` of ``net``) only improves the error message.
    Raises :class:`InitSourceError` when the source is missing, unreadable or does not fit.
    """
    ours = _describe(model_spec) if model_spec else type(net).__name__
    text = str(source)
    if text.startswith(TORCHVISION):
        name = text[len(TORCHVISION) :]
        state = _torchvision_state(backbone(net), name, ours)
        _load_plain_state(backbone(net), state, text, ours)
        return {"source": text, "kind": "torchvision", **_start_new_gate(net)}
    path = Path(source)
    if not path.exists():
        raise InitSourceError(
            f"train.init_from={source} not found: give a run directory, a checkpoint, a .safetensors "
            "or .pt state dict or torchvision:<Weights.NAME>"
        )
    if path.is_file() and path.suffix in TORCH_FILES:
        state = _torch_state(path)
        _load_plain_state(backbone(net), state, str(path), ours)
        return {"source": str(path), "kind": "state_dict", **_start_new_gate(net)}
    file = _model_file(path)
    if _is_dynaslice_file(file):
        try:
            tensors, meta = load_model_file(file)
        except CheckpointError as e:
            raise InitSourceError(f"train.init_from: {e}") from None
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        if not state:
            raise InitSourceError(f"train.init_from={file} holds no model weights")
        gated_source = any(k.startswith("gate.") for k in state)
        if gated_source and not isinstance(net, GatedSupernet):  # its backbone learnt with the gate
            raise InitSourceError(
                f"train.init_from={file} is a gated supernet and {ours} has no gate: "
                "set model.gate.enabled=true (with the same gate) to start from it"
            )
        into = net if gated_source else backbone(net)
        _load_supernet_state(into, state, str(file), meta.get("model"), ours)
        info = {"source": str(file), "kind": "dynaslice", "model": meta.get("model")}
        return info if gated_source else {**info, **_start_new_gate(net)}
    state = load_file(str(file))
    _load_plain_state(backbone(net), state, str(file), ours)
    return {"source": str(file), "kind": "state_dict", **_start_new_gate(net)}


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict written by ``torch.save``, read with ``weights_only`` (tensors and containers only: a
    pickle that would run code is refused by torch), flat ``{name: tensor}`` as ``state_dict()`` gives."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InitSourceError(f"train.init_from: cannot read {path} as a torch state dict ({text})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InitSourceError(
            f"train.init_from: {path} is not a state dict (a mapping of names to tensors, as "
            "torch.save(model.state_dict(), path) writes)"
        )
    return state


def backbone(net: Supernet) -> Supernet:
    """Where a network trained without a gate goes: a gated supernet's wrapped net, else ``net``."""
    return net.net if isinstance(net, GatedSupernet) else net


def _start_new_gate(net: Supernet) -> dict[str, Any]:
    """After loading a gate-less network into a gated supernet: its new attention head starts
    near the identity (:meth:`DynamicGate.start_near_identity`), so the loaded network, and the
    frozen teacher made from it, keep their accuracy. ``{}`` for a supernet without a gate."""
    if not isinstance(net, GatedSupernet):
        return {}
    net.gate.start_near_identity()
    return {"gate": "new: attention head started near the identity"}


def _load_plain_state(net: Supernet, state: dict[str, torch.Tensor], source: str, ours: str) -> None:
    try:
        load_pretrained(net, state)
    except ValueError as e:
        first = str(e).split(":")[0]
        raise InitSourceError(
            f"train.init_from={source} does not fit the largest subnet of {ours} ({first}); "
            "give weights of the same family and number of classes"
        ) from None


def frozen_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` in eval mode: the teacher of :class:`FrozenTeacherTarget`.

    No parameter of the copy requires a gradient and it stays in eval mode (its BatchNorm uses
    the running statistics it was trained with), whatever mode the student is in.
    """
    teacher = copy.deepcopy(net)
    teacher.requires_grad_(False)
    return teacher.eval()


def last_bn_of_residual_blocks(net: nn.Module) -> list[SlicedBatchNorm2d]:
    """The BatchNorm that ends each residual branch (ResNet ``bn2``/``bn3``; MobileNetV2 blocks
    with a shortcut): the layers :func:`zero_init_last_bn` zeroes."""
    from ..models.mobilenet import InvertedResidual
    from ..models.resnet import BasicBlock, Bottleneck

    out = []
    for m in net.modules():
        if isinstance(m, BasicBlock):
            out.append(m.bn2)
        elif isinstance(m, Bottleneck):
            out.append(m.bn3)
        elif isinstance(m, InvertedResidual) and m.use_res_connect:
            out.append(m.conv[-1])
    return out


@torch.no_grad()
def zero_init_last_bn(net: nn.Module) -> int:
    """Zero the gamma of the last BatchNorm of every residual branch (Goyal et al. 2017; torchvision's
    ``zero_init_residual``): each block starts as the identity, which steadies short runs.
    Returns how many layers were zeroed; a family without residual blocks is left unchanged."""
    layers = last_bn_of_residual_blocks(net)
    for bn in layers:
        bn.weight.zero_()
    return len(layers)
