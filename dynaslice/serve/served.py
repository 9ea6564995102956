"""The three deployable artifacts, each on any runtime, with one call signature per kind.

- :class:`ServedSubnet`: ``model(x) -> logits`` (one static subnet);
- :class:`ServedBudget`: ``model(x, max_macs=..., max_latency_ms=...) -> logits`` (a PSS budget
  table: the most accurate entry within the budget, as :class:`~dynaslice.budget.BudgetNet`);
- :class:`ServedGated`: ``model(x) -> logits`` and ``model.forward_with_routes(x)`` (a DS-Net
  gated model: trunk and gate on the whole batch, then samples grouped by route, each group
  through its route's piece, as :class:`~dynaslice.dynamic.DynamicNet`).

Each is a few *pieces* (:func:`dynaslice.serve.runtimes.prepare`): the pieces are built once at
load, so switching budget or route costs a lookup and no call builds anything.

Inputs: a torch tensor ``[B, C, H, W]`` (answers are tensors) or a float numpy array (answers
are numpy arrays, computed in float32, the dtype every served model takes). An input holding NaN
or an infinity is refused with a ``ValueError`` on every runtime: the runtimes do not agree on
such inputs (eager and onnxruntime propagate NaN; the frozen runtime's fused kernels turned a
NaN pixel into finite, confident logits), and a served model must not answer differently by
runtime. The check costs a pass over the input (microseconds at batch 1; on CUDA, a sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..budget import BudgetEntry, BudgetNet
from ..counting import count_macs
from ..gate import GatedSupernet
from ..gate.gated import check_route_index
from ..models.base import Supernet
from ..onnx_export import extract_route, extract_trunk
from ..onnx_package import pick_entry, run_gated, run_grouped
from ..torch_export import extract_subnet
from .runtimes import OrtPiece, Piece, example_input, prepare, resolve_runtime, to_numpy

Input = torch.Tensor | np.ndarray


def take_input(x: Any, device: torch.device) -> tuple[torch.Tensor, bool]:
    """``x`` as a tensor (a numpy array moved to ``device`` as float32), and whether it came as
    numpy (the answer goes back as numpy then). Refuses anything but a tensor or a float array,
    and non-finite values (see the module docstring)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise ValueError(f"served models take float arrays [B, C, H, W], got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError(_NOT_FINITE)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device), True
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"served models take a torch tensor or a numpy array [B, C, H, W], got {type(x).__name__}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(_NOT_FINITE)
    return x, False


_NOT_FINITE = (
    "the input holds NaN or infinite values: served models refuse them (runtimes disagree on what "
    "they give); clean or mask those samples first"
)


def _give(y: torch.Tensor, numpy: bool) -> Input:
    return y.detach().cpu().numpy() if numpy else y


class ServedSubnet:
    """One static subnet on a runtime: ``model(x) -> logits``."""

    def __init__(
        self,
        piece: Piece,
        runtime: str,
        arch: dict[str, int] | None,
        macs: int | None,
        device: torch.device | str = "cpu",
    ):
        self.piece, self.runtime, self.arch, self.macs = piece, runtime, arch, macs
        self.device = torch.device(device)

    def __call__(self, x: Input) -> Input:
        x, numpy = take_input(x, self.device)
        return _give(self.piece(x), numpy)  # type: ignore[arg-type]


class ServedBudget:
    """A PSS budget table on a runtime: one piece per entry, switched per call."""

    def __init__(
        self,
        pieces: Sequence[Piece],
        entries: Sequence[BudgetEntry],
        runtime: str,
        device: torch.device | str = "cpu",
    ):
        if len(pieces) != len(entries) or not entries:
            raise ValueError(f"{len(pieces)} pieces for {len(entries)} budget entries")
        self.pieces, self.entries, self.runtime = list(pieces), list(entries), runtime
        self.device = torch.device(device)
        self._rows = [e.to_dict() for e in self.entries]

    def entry(self, max_macs: float | None = None, max_latency_ms: float | None = None) -> BudgetEntry:
        """The entry a call with this budget runs (:func:`dynaslice.onnx_package.pick_entry`)."""
        return self.entries[pick_entry(self._rows, max_macs, max_latency_ms)]

    def __call__(self, x: Input, max_macs: float | None = None, max_latency_ms: float | None = None) -> Input:
        """Logits of the entry this budget picks. Budgets are numbers (``12e6`` MACs, not ``"12M"``:
        the command line's parser reads that form)."""
        piece = self.pieces[pick_entry(self._rows, max_macs, max_latency_ms)]
        x, numpy = take_input(x, self.device)
        return _give(piece(x), numpy)  # type: ignore[arg-type]


class ServedGated:
    """A gated (DS-Net) model on a runtime: the trunk piece returns ``(features, route logits)``;
    one piece per route maps features to class logits.

    When every piece is an onnxruntime session on the CPU (an exported package from
    :func:`dynaslice.serve.load`, or the ``onnxruntime`` runtime) a call is the onnxruntime form's
    own forward, :func:`dynaslice.onnx_package.run_gated`, numpy between the sessions: next to a
    model that runs in half a millisecond, torch round trips and grouping ops cost about 15 % of a
    batch-1 call (issue 16). Other runtimes group with the same :func:`~dynaslice.onnx_package.run_grouped`.
    """

    def __init__(
        self,
        trunk: Piece,
        routes: Sequence[Piece],
        route_macs: Sequence[float],
        runtime: str,
        device: torch.device | str = "cpu",
    ):
        self.trunk, self.routes, self.runtime = trunk, list(routes), runtime
        self.device = torch.device(device)
        self.route_macs = torch.tensor([float(m) for m in route_macs], dtype=torch.float64)
        pieces = [trunk, *self.routes]
        self._numpy = all(isinstance(p, OrtPiece) and p.device.type == "cpu" for p in pieces)

    def route(self, x: Input) -> Input:
        """The route index of each sample: argmax of the gate's logits (never noise)."""
        x, numpy = take_input(x, self.device)
        return _give(self.trunk(x)[1].argmax(1), numpy)

    def forward_with_routes(self, x: Input, routes: Input | None = None) -> tuple[Input, Input]:
        """``(class logits, route per sample)``; ``routes`` overrides the gate's choice (it still runs)."""
        x, numpy = take_input(x, self.device)
        if isinstance(routes, np.ndarray):
            routes = torch.from_numpy(routes)
        if routes is not None:
            check_route_index(routes, x.shape[0])
        if self._numpy:  # the onnxruntime form's own forward, no torch op between the sessions
            sessions = [p.session for p in self.routes]  # type: ignore[attr-defined]
            chosen = None if routes is None else routes.cpu().numpy()
            out, chosen = run_gated(self.trunk.session, sessions, to_numpy(x), chosen)  # type: ignore[attr-defined]
            return _give(torch.from_numpy(out), numpy), _give(torch.from_numpy(chosen), numpy)
        features, logits = self.trunk(x)
        routes = logits.argmax(1) if routes is None else routes.to(logits.device)
        out = run_grouped(features, routes.cpu(), lambda h, r: self.routes[r](h), len(self.routes))
        return _give(out, numpy), _give(routes, numpy)

    def __call__(self, x: Input) -> Input:
        return self.forward_with_routes(x)[0]

    def avg_macs(self, routes: Input) -> float:
        """Average MACs per image for these route choices (trunk, gate and route)."""
        routes = torch.as_tensor(routes).flatten().cpu()
        if routes.numel() == 0 or routes.dtype.is_floating_point or routes.dtype == torch.bool:
            raise ValueError(
                f"avg_macs takes route indices (integers), got {routes.dtype} {list(routes.shape)}"
            )
        low, high = int(routes.min()), int(routes.max())  # -1 would wrap to the last route
        if low < 0 or high >= len(self.routes):
            raise ValueError(f"route indices {[low, high]} outside 0..{len(self.routes) - 1}")
        return float(self.route_macs[routes].mean())


# --------------------------------------------------------------------------- from PyTorch models


def _device(module: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else next(module.parameters()).device


def serve_subnet(
    net: Supernet, arch: Any, runtime: str = "auto", device: str | torch.device | None = None
) -> ServedSubnet:
    """Subnet ``arch`` of ``net`` (eval mode, its BN statistics as they are) on ``runtime``."""
    dev = _device(net, device)
    runtime = resolve_runtime(runtime, dev)
    arch = net.space.validate(arch)
    piece = prepare(extract_subnet(net.eval(), arch), example_input(net.input_size, dev), runtime)
    return ServedSubnet(piece, runtime, arch.to_dict(), int(count_macs(net, arch)), dev)


def serve_budget(budget: BudgetNet, runtime: str = "auto", device: str | torch.device | None = None) -> ServedBudget:
    """Every entry of a PSS budget table, each with the BN statistics it was selected with."""
    net = budget.net.eval()
    dev = _device(net, device)
    runtime = resolve_runtime(runtime, dev)
    example = example_input(net.input_size, dev)
    pieces = [prepare(extract_subnet(net, budget.use(e)), example, runtime) for e in budget.table.entries]
    return ServedBudget(pieces, budget.table.entries, runtime, dev)


def serve_gated(gated: GatedSupernet, runtime: str = "auto", device: str | torch.device | None = None) -> ServedGated:
    """A gated model: its trunk (with the gate) and each route as pieces on ``runtime``."""
    gated = gated.eval()
    dev = _device(gated, device)
    runtime = resolve_runtime(runtime, dev)
    trunk = extract_trunk(gated)
    example = example_input(gated.input_size, dev)
    with torch.inference_mode():
        features, _ = trunk.to(dev)(example)
    route_example = torch.zeros_like(features)
    routes = [prepare(extract_route(gated, r, tuple(features.shape[1:])), route_example, runtime)
              for r in range(len(gated.routes))]  # fmt: skip
    return ServedGated(prepare(trunk, example, runtime), routes, gated.route_macs().tolist(), runtime, dev)


__all__ = ["ServedBudget", "ServedGated", "ServedSubnet", "serve_budget", "serve_gated", "serve_subnet"]
