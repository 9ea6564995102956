"""ONNX export: a static subnet as one ``.onnx`` file, a gated (DS-Net) model or a PSS budget
table as a package (one graph per route or entry, plus ``manifest.json``).

Both start from :func:`dynaslice.extract_subnet`: the subnet (or a piece of the gated model)
becomes a ``torch.fx.GraphModule`` of plain torch modules with the sliced weights copied, so the
ONNX graph has dense, right-sized weights and nothing of dynaslice inside.

**Which exporter.** ``exporter="torchscript"`` (the default) is torch's TorchScript-based
exporter (``torch.onnx.export(..., dynamo=False)``). It traces the GraphModule's generated
``forward`` -- ordinary Python over standard torch modules, which it exports exactly -- in about a
second per model here, against 5-40 s for the torch.export-based one (most of it in
decompositions; a MobileNetV2 gated package would take minutes). It is deprecated since torch 2.9
but present and working in the pinned torch. ``exporter="dynamo"`` uses the new
``torch.export``-based exporter (torch's default, needs ``onnxscript``); it is tested too and is
the path to take once the TorchScript exporter is removed. Both give a dynamic batch dimension:
the dynamo path is traced with an example batch of 2, since an example batch of 1 lets
``torch.export`` specialise the batch to a constant.

Files are written to a temporary name in the target directory, checked with
``onnx.checker.check_model(full_check=True)`` and renamed; a package directory is built next to
its final name and renamed into place, so an export is complete or absent. Models must stay under
ONNX's 2 GB single-file limit (no external data files).

Run the results with :mod:`dynaslice.onnx_package` (onnxruntime + numpy, no torch).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import fx, nn

from . import runs
from .atomic import atomic_dir, atomic_path
from .budget import BudgetNet
from .gate import GatedSupernet
from .models.base import Supernet
from .onnx_package import (
    BUDGET_FORMAT,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    package_file,
    package_members,
    read_manifest,
)
from .torch_export import extract_subnet
from .version import __version__

Exporter = Literal["torchscript", "dynamo"]

__all__ = [
    "check_package_target",
    "export_budget",
    "export_gated",
    "export_module",
    "export_onnx",
    "extract_route",
    "extract_trunk",
]


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx package: pip install 'dynaslice[onnx]'") from e
    return onnx


# --------------------------------------------------------------------------- one module -> one file


def _export_module(
    module: nn.Module,
    path: Path,
    input_size: Sequence[int],
    input_names: list[str],
    output_names: list[str],
    batch_dynamic: bool,
    opset: int | None,
    exporter: Exporter,
    metadata: Mapping[str, str],
) -> None:
    """Export ``module`` (put in eval mode) to ``path`` atomically and check the result."""
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    onnx = _onnx()
    module = module.eval()
    param = next(module.parameters(), None)
    dtype, device = (param.dtype, param.device) if param is not None else (torch.float32, None)
    example = torch.zeros(2 if batch_dynamic else 1, *input_size, dtype=dtype, device=device)
    with atomic_path(path) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            if exporter == "torchscript":
                # Chosen on purpose (see the module docstring), so its deprecation notices are noise
                # here; so is its note that slices with a step are computed at run time.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", message="The feature will be removed")
                warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
                axes = {n: {0: "batch"} for n in input_names + output_names} if batch_dynamic else None
                torch.onnx.export(
                    module, (example,), str(tmp), dynamo=False, opset_version=opset,
                    input_names=input_names, output_names=output_names, dynamic_axes=axes,
                )  # fmt: skip
            else:
                shapes = ({0: torch.export.Dim("batch", min=1)},) if batch_dynamic else None
                torch.onnx.export(
                    module, (example,), str(tmp), dynamo=True, opset_version=opset, verbose=False,
                    external_data=False, input_names=input_names, output_names=output_names,
                    dynamic_shapes=shapes,
                )  # fmt: skip
        model = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))


def export_module(
    module: nn.Module,
    path: str | os.PathLike,
    input_size: Sequence[int],
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("logits",),
    batch_dynamic: bool = True,
    opset: int | None = None,
    exporter: Exporter = "torchscript",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write any plain-torch ``module`` (a pruned or quantization-ready network, an extracted
    subnet) to ``path`` as ONNX, atomically and checked; ``input_size`` is ``(C, H, W)``."""
    path = Path(path)
    _export_module(module, path, tuple(input_size), list(input_names), list(output_names), batch_dynamic,
                   opset, exporter, {"dynaslice.version": __version__, **(metadata or {})})  # fmt: skip
    return path


def _opset(path: Path) -> int:
    """The default-domain opset that ``path`` was written with."""
    model = _onnx().load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(
    net: Supernet,
    arch: Mapping[str, int],
    path: str | os.PathLike,
    input_size: Sequence[int] | None = None,
    batch_dynamic: bool = True,
    opset: int | None = None,
    exporter: Exporter = "torchscript",
) -> Path:
    """Write the static subnet ``arch`` of ``net`` to ``path`` as ONNX; returns the path.

    The subnet is extracted with :func:`dynaslice.extract_subnet` and exported in eval mode
    (BatchNorm uses that width's running statistics; ``net`` itself is not touched). Input
    ``input`` ``[batch, C, H, W]`` (``input_size`` ``(C, H, W)``, default ``net.input_size``),
    output ``logits``; the batch dimension is dynamic unless ``batch_dynamic=False`` (then 1).
    ``opset`` defaults to the exporter's default. The arch is stored in the model's metadata
    (``dynaslice.arch``, JSON). Run it with :class:`dynaslice.onnx_package.OnnxModel`.
    """
    arch = net.space.validate(arch)
    input_size = tuple(input_size or net.input_size)
    subnet = extract_subnet(net, arch, input_size)
    path = Path(path)
    metadata = {"dynaslice.arch": arch.to_json(), "dynaslice.version": __version__}
    _export_module(subnet, path, input_size, ["input"], ["logits"], batch_dynamic, opset, exporter, metadata)
    return path


# --------------------------------------------------------------------------- gated model pieces


class GatedTrunk(nn.Module):
    """The gated model before its routes, shaped like a Supernet so ``extract_subnet`` extracts it.

    ``extract_subnet(piece, arch)`` traces ``piece(x, arch)`` and keeps the names of ``piece``'s
    submodules; holding the gated model's own children (``net``, ``gate``) keeps their names
    (``net.layer1.0.conv1``, ``gate.reduce``) in the result. ``forward(x, route0) = gated.trunk(x)``.
    """

    def __init__(self, gated: GatedSupernet):
        super().__init__()
        self.net, self.gate, self.cut = gated.net, gated.gate, gated.cut
        self.space, self.input_size = gated.net.space, gated.input_size

    def forward(self, x: torch.Tensor, arch: Mapping[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(self.net.forward_to(x, arch, self.cut))


class GatedRoute(nn.Module):
    """The gated model after the gate, for one route: ``forward(h, route) = gated.forward_route(h, r)``."""

    def __init__(self, gated: GatedSupernet, features_size: Sequence[int]):
        super().__init__()
        self.net, self.cut = gated.net, gated.cut
        self.space, self.input_size = gated.net.space, tuple(features_size)

    def forward(self, h: torch.Tensor, arch: Mapping[str, int]) -> torch.Tensor:
        return self.net.forward_from(h, arch, self.cut)


def extract_trunk(gated: GatedSupernet, input_size: Sequence[int] | None = None) -> fx.GraphModule:
    """``gated.trunk`` as a plain-torch GraphModule: ``x -> (features, route logits)``."""
    return extract_subnet(GatedTrunk(gated), gated.routes[0], input_size or gated.input_size)  # type: ignore[arg-type]


def extract_route(gated: GatedSupernet, route: int, features_size: Sequence[int]) -> fx.GraphModule:
    """Route ``route`` after the gate as a plain-torch GraphModule: ``features -> class logits``.

    ``features_size`` is the trunk's output shape without the batch (``(C, H, W)`` or ``(N, C)``).
    """
    return extract_subnet(GatedRoute(gated, features_size), gated.routes[route])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the gated package


def check_package_target(directory: str | os.PathLike) -> None:
    """Refuse a package's output folder that a replacement would lose anything in.

    ``directory`` may be absent, empty, or hold a dynaslice package and nothing else: its
    manifest and the files the manifest names (and the lock of a writer of the package,
    :func:`dynaslice.runs.exclusive`).
    A user's results or a subfolder beside a package, a folder of other things, a file or a
    link are refused with ``FileExistsError`` naming what is in the way; a name ending in
    ``.onnx`` is refused too (``ValueError``): a package is a folder, and ``dynaslice.serve.load``
    reads a ``.onnx`` path as one model file. Used by every writer of packages (the exports and
    ``dynaslice quantize``).
    """
    directory = Path(directory)
    if directory.suffix == ".onnx":
        raise ValueError(
            f"{directory}: a package is a folder; give it a name that does not end in .onnx "
            "(that is a single model file: export one subnet with --arch for that)"
        )
    if directory.is_symlink():
        raise FileExistsError(f"{directory} is a symbolic link; give the package folder itself, or a new one")
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a dynaslice ONNX package; choose a new name")
    present = set(os.listdir(directory)) - {runs.LOCK}
    if not present:
        return
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError):
        raise FileExistsError(
            f"{directory} exists and is not a dynaslice ONNX package; choose a new directory or remove it"
        ) from None
    others = sorted(present - {MANIFEST, *package_members(manifest)})
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise FileExistsError(
            f"{directory} holds a package and other things ({shown}) that replacing it would delete; "
            "move them out or choose a new directory"
        )


def export_gated(
    gated: GatedSupernet | nn.Module,
    directory: str | os.PathLike,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    opset: int | None = None,
    exporter: Exporter = "torchscript",
) -> Path:
    """Write ``gated`` (a :class:`GatedSupernet`, or a ``DynamicNet`` of one) as an ONNX package.

    The directory gets ``trunk.onnx`` (``input -> features, logits``: stem, stages before the
    cut and the gate), one ``route_{i}.onnx`` per route (``features -> logits``: the route's dense
    slices of the stages after the cut and the head) and ``manifest.json`` (format version,
    input shape/dtype, the normalisation ``mean``/``std`` when given, cut, routes with their arch
    and MACs per image (trunk + gate + route), files, number of classes). Everything is exported
    in eval mode. The directory is built beside its final name and renamed into place; an
    earlier package there is replaced, a folder holding anything else refused
    (:func:`check_package_target`). Run it with :class:`dynaslice.onnx_package.GatedOnnxRunner`.
    """
    gated = getattr(gated, "gated", gated)  # a DynamicNet wraps its GatedSupernet
    if not isinstance(gated, GatedSupernet):
        raise TypeError(f"export_gated takes a GatedSupernet (or a DynamicNet), got {type(gated).__name__}")
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std (the input normalisation) or neither")
    directory = Path(directory)
    check_package_target(directory)
    input_size = tuple(input_size or gated.input_size)
    if mean is not None and not len(mean) == len(std) == input_size[0]:
        raise ValueError(
            f"mean and std need one value per input channel ({input_size[0]}), got {len(mean)} and {len(std)}"
        )

    with atomic_dir(directory) as tmp:
        trunk = extract_trunk(gated, input_size).eval()
        with torch.no_grad():
            param = next(trunk.parameters())
            features, _ = trunk(torch.zeros(1, *input_size, dtype=param.dtype, device=param.device))
        features_size = tuple(features.shape[1:])
        common = {"dynaslice.version": __version__, "dynaslice.cut": str(gated.cut)}
        # every file of the package by the package rule, as every reader takes it (dynaslice.onnx_package)
        _export_module(
            trunk, package_file(tmp, "trunk.onnx", exists=False), input_size, ["input"], ["features", "logits"],
            True, opset, exporter, common,
        )  # fmt: skip
        route_macs = gated.route_macs(input_size)
        routes = []
        for r, arch in enumerate(gated.routes):
            name = f"route_{r}.onnx"
            module = extract_route(gated, r, features_size)
            metadata = {**common, "dynaslice.arch": arch.to_json(), "dynaslice.route": str(r)}
            file = package_file(tmp, name, exists=False)
            _export_module(
                module, file, features_size, ["features"], ["logits"], True, opset, exporter, metadata
            )
            routes.append({"index": r, "file": name, "arch": arch.to_dict(), "macs": int(route_macs[r])})
        manifest = _gated_manifest(gated, input_size, str(param.dtype), mean, std, features_size, routes)
        manifest.update(exporter=exporter, opset=_opset(tmp / "trunk.onnx"))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        check_package_target(directory)  # it may have appeared while we exported
    return directory


def _input_spec(
    input_size: Sequence[int], dtype: str, mean: Sequence[float] | None, std: Sequence[float] | None
) -> dict:
    """The manifest's ``input``: what the runners check inputs against (and the normalisation)."""
    if mean is not None and not len(mean) == len(std) == input_size[0]:  # type: ignore[arg-type]
        raise ValueError(f"mean and std need one value per input channel ({input_size[0]})")
    return {
        "name": "input",
        "shape": [None, *input_size],
        "dtype": dtype.removeprefix("torch."),
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
    }


def _gated_manifest(
    gated: GatedSupernet,
    input_size: Sequence[int],
    dtype: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    features_size: Sequence[int],
    routes: list[dict],
) -> dict:
    """``manifest.json`` of a gated package (read back by :func:`dynaslice.onnx_package.read_manifest`)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dynaslice_version": __version__,
        "family": type(gated.net).__name__,
        "num_classes": gated.num_classes,
        "input": _input_spec(input_size, dtype, mean, std),
        "cut": gated.cut,
        "trunk": {"file": "trunk.onnx", "outputs": ["features", "logits"], "features_shape": [None, *features_size]},
        "gate_macs": gated.gate.macs(),
        "routes": routes,
    }


# --------------------------------------------------------------------------- the budget-table package


def export_budget(
    budget: BudgetNet,
    directory: str | os.PathLike,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    opset: int | None = None,
    exporter: Exporter = "torchscript",
) -> Path:
    """Write a PSS budget table (a :class:`~dynaslice.budget.BudgetNet`) as an ONNX package.

    One ``entry_{i}.onnx`` per table entry -- its subnet with the BN statistics it was selected
    with -- and ``manifest.json`` (the entries' bucket, arch, MACs, validation accuracy, predicted
    latency and file, the input shape/dtype/normalisation). Run it with
    :class:`dynaslice.onnx_package.BudgetOnnxRunner` (``runner(x, max_macs=...)``) or
    :func:`dynaslice.serve.load`. Complete or absent, like :func:`export_gated`.
    """
    if not isinstance(budget, BudgetNet):
        raise TypeError(f"export_budget takes a BudgetNet, got {type(budget).__name__}")
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std (the input normalisation) or neither")
    directory = Path(directory)
    check_package_target(directory)
    net = budget.net.eval()
    input_size = tuple(input_size or net.input_size)
    spec = _input_spec(input_size, str(next(net.parameters()).dtype), mean, std)
    entries = []
    with atomic_dir(directory) as tmp:
        for i, entry in enumerate(budget.table.entries):
            arch = budget.use(entry)
            file = package_file(tmp, f"entry_{i}.onnx", exists=False)
            export_onnx(net, arch, file, input_size, opset=opset, exporter=exporter)
            entries.append({**entry.to_dict(), "file": f"entry_{i}.onnx"})
        manifest = {
            "format": BUDGET_FORMAT,
            "format_version": FORMAT_VERSION,
            "dynaslice_version": __version__,
            "family": type(net).__name__,
            "num_classes": net.num_classes,
            "input": spec,
            "table": dict(budget.table.meta),
            "entries": entries,
            "exporter": exporter,
            "opset": _opset(tmp / "entry_0.onnx"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        check_package_target(directory)  # it may have appeared while we exported
    return directory
