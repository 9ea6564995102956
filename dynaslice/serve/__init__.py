"""Serving: every deployable artifact on the runtime of your choice, with one call signature per kind.

    import dynaslice.serve as serve

    model = serve.load("runs/demo/export/gated")                 # a gated ONNX package: onnxruntime
    model = serve.load("runs/demo/gate-t0.5", runtime="frozen")   # the same model from its checkpoint
    y = model(x)                                                  # x: float [B, C, H, W], tensor or numpy
    budget = serve.load("runs/pss")                               # a PSS budget table (run or package)
    y = budget(x, max_macs=12e6)                                  # switching budget: a lookup
    sub = serve.load("runs/quick/recalibrated.safetensors", arch="x0.5")

Runtimes (:mod:`.runtimes`): ``eager`` (the reference), ``frozen`` (TorchScript, BN folded),
``compile`` (``torch.compile``), ``onnxruntime`` and, on CUDA, ``cudagraph``; ``auto`` picks the
fastest correct one measured on this kind of device (docs/RESULTS.md). Outputs equal eager's
(tested). Nothing is built per call: sessions, scripted graphs and CUDA graphs are made at load.
Inputs with NaN or infinities are refused on every runtime (:mod:`.served`). A package is read
by the onnxruntime form's runners (:func:`dynaslice.onnx_package.open_package`: the package rule of
:func:`~dynaslice.onnx_package.package_file`, its own files only, no links, size-capped, at most
:data:`~dynaslice.onnx_package.MAX_ITEMS` routes or entries, one session per file); the served
object only adds the call convention above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import runs
from ..archspec import parse_arch
from ..binary.packed import BinaryRunner, is_binary_package
from ..budget import BudgetEntry, BudgetNet
from ..gate import GatedSupernet
from ..modelfile import load_supernet
from ..onnx_package import MANIFEST, GatedOnnxRunner, open_package, providers_for
from .runtimes import (
    PREFERRED,
    RUNTIMES,
    OrtPiece,
    available_runtimes,
    ort_session,
    prepare,
    resolve_runtime,
    to_numpy,
)
from .served import ServedBudget, ServedGated, ServedSubnet, serve_budget, serve_gated, serve_subnet

Served = ServedSubnet | ServedBudget | ServedGated


def load(
    path: str | Path, runtime: str = "auto", arch: Any = None, device: str | torch.device = "cpu"
) -> Served:
    """An artifact ready to serve: an ``.onnx`` subnet, a gated or budget ONNX package, a 1-bit
    binary package (``dynaslice.binary.packed``, on its own CPU kernel), a PSS run
    (or its ``budget.safetensors``), a gated checkpoint, or a supernet model file with ``arch``
    (any form of :func:`dynaslice.archspec.parse_arch`, the one reading of ``dynaslice export --arch``:
    an Arch or dict, ``"largest"``, ``"x0.5"`` / ``0.5``, ``"routeN"``, inline JSON or a ``.json`` file).

    ONNX artifacts run on onnxruntime only (``runtime`` ``auto`` or ``onnxruntime``); PyTorch
    artifacts on any runtime of :func:`available_runtimes`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass an .onnx file, an ONNX package, a run directory or a model file")
    device = torch.device(device)
    if path.is_dir() and is_binary_package(path):
        return _load_binary(path, runtime, device)
    if path.suffix == ".onnx" or (path / MANIFEST).is_file():
        return _load_onnx(path, runtime, device)
    budget_file = path / runs.BUDGET_WEIGHTS if path.is_dir() else path
    if budget_file.name == runs.BUDGET_WEIGHTS and budget_file.is_file():
        return serve_budget(BudgetNet.load(budget_file).to(device), runtime, device)
    net, _ = load_supernet(path)
    net = net.to(device)
    if isinstance(net, GatedSupernet) and arch is None:
        return serve_gated(net, runtime, device)
    if arch is None:
        raise ValueError(f"{path} is a supernet: pass arch= (e.g. 'x0.5', 'largest' or a dict) to serve one subnet")
    return serve_subnet(net, parse_arch(arch, net, flag="arch="), runtime, device)


def _load_binary(path: Path, runtime: str, device: torch.device) -> ServedSubnet:
    """A 1-bit package (:mod:`dynaslice.binary.packed`) on its own kernel: CPU only, runtime ``auto``
    or ``binary``; ``DYNASLICE_BINARY_KERNEL`` forces a kernel path."""
    if runtime not in ("auto", "binary"):
        raise ValueError(f"{path} is a binary package: it runs on the 1-bit kernel (runtime='auto'), not {runtime!r}")
    if device.type != "cpu":
        raise ValueError(f"{path} is a binary package: its 1-bit kernel runs on the CPU, not {device}")
    runner = BinaryRunner(path)
    piece = lambda x: torch.from_numpy(runner(to_numpy(x)))  # noqa: E731
    return ServedSubnet(piece, "binary", None, None, device)


def _load_onnx(path: Path, runtime: str, device: torch.device) -> Served:
    if runtime not in ("auto", "onnxruntime"):
        raise ValueError(
            f"{path} is ONNX: it runs on onnxruntime (runtime='auto'); for {runtime!r}, load the model file it was exported from"
        )
    resolve_runtime("onnxruntime", device)  # installed, and a provider for the device
    if path.suffix == ".onnx":
        return ServedSubnet(OrtPiece(ort_session(path, device), device), "onnxruntime", None, None, device)
    # the onnxruntime form opens the package (manifest, package rule, one checked session per
    # file) and runs it; serving adds its call convention only (tensors or numpy, NaN refused)
    runner = open_package(path, providers_for(device.type), threads=torch.get_num_threads())
    if isinstance(runner, GatedOnnxRunner):
        routes = [OrtPiece(session, device) for session in runner.sessions]
        return ServedGated(OrtPiece(runner.trunk, device), routes, runner.route_macs.tolist(), "onnxruntime", device)
    entries = [BudgetEntry.from_dict(e) for e in runner.entries]
    return ServedBudget([OrtPiece(m.session, device) for m in runner.models], entries, "onnxruntime", device)


__all__ = [
    "PREFERRED",
    "RUNTIMES",
    "Served",
    "ServedBudget",
    "ServedGated",
    "ServedSubnet",
    "available_runtimes",
    "load",
    "prepare",
    "resolve_runtime",
    "serve_budget",
    "serve_gated",
    "serve_subnet",
]
