"""A supernet with a gate: Stage I trains it like any supernet, Stage II trains its slimming head,
and inference routes each input through the subnet its gate picks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..counting import count_macs, meta_copy
from ..models.base import Supernet
from ..onnx_package import run_grouped
from ..space import Arch, Dim, SearchSpace
from .module import DynamicGate
from .routes import ArchLike, routes_even, validate_routes


class GatedSupernet(Supernet):
    """A supernet with a :class:`DynamicGate` before stage ``cut`` and a list of routes.

    It is itself a :class:`Supernet` over the *restricted* space in which the pre-gate dims have
    their one fixed value, so Stage I trains it like any supernet (``forward(x, arch)``: the
    gate's attention head scales the features at the cut; the slimming head is not used), and
    ``count_macs(gated, arch)`` counts the attention head too. For Stage II and inference:

    - ``trunk(x) -> (h, logits)``: stem and stages before the cut at the fixed width, then the
      gate; ``h`` is the attention-scaled features, ``logits`` ``[B, n_routes]`` the slimming head's.
      One call computes both: the heads share the gate's pooled features.
    - ``forward_route(h, r)``: the rest of the network with route ``r``'s slices;
    - ``forward_routes(h, route_index)``: per-sample routes, grouped, outputs in input order;
    - ``forward_mixed(h, weights)``: the same, scaled by the straight-through weight of each
      sample's route, so the task loss trains the slimming head.

    ``routes``: an int ``k`` (:func:`routes_even`, with ``pre_gate``) or an explicit list of archs
    (:func:`validate_routes`). ``cut``: a stage number, defaulting to the family's
    :meth:`Supernet.default_gate_cut`; for a network converted by ``make_supernet``, a module path
    (``"layer2"``) or its default cut (:meth:`Supernet.gate_split`): ``self.net`` is then the
    network split there, ``self.cut`` 1 and ``self.cut_spec`` the path a model file records.
    """

    def __init__(
        self,
        net: Supernet,
        cut: int | str | None = None,
        routes: int | Sequence[ArchLike] = 4,
        pre_gate: Mapping[str, int] | None = None,
        reduction: int = 4,
        hidden: int | None = None,
    ):
        super().__init__()
        net, cut, self.cut_spec = net.gate_split(cut)
        if isinstance(routes, int):
            archs = routes_even(net, routes, cut, pre_gate)
        else:
            if pre_gate is not None:
                raise ValueError("pass pre_gate only with routes=<int>; explicit routes already fix it")
            archs = validate_routes(net, routes, cut)
        self.net, self.cut, self.routes = net, cut, tuple(archs)
        self.num_classes, self.n_stages, self.input_size = net.num_classes, net.n_stages, net.input_size
        self.analytic_costs = getattr(net, "analytic_costs", True)  # how count_macs counts (counting.py)
        fixed = {d: archs[0][d] for d in net.dims_before(cut)}
        self.space = _pinned_space(net.space, fixed)

        # The gate's width and input kind: one shape-only pass of the trunk on the meta device.
        meta = meta_copy(net)
        with torch.no_grad():
            y = meta.forward_to(torch.empty(1, *net.input_size, device="meta"), archs[0], cut)
        if y.dim() == 4:
            channels, tokens = y.shape[1], False
        elif y.dim() == 3:
            channels, tokens = y.shape[2], True
        else:
            raise ValueError(
                f"{type(net).__name__} stage output at cut {cut} has shape {tuple(y.shape)}; "
                "the gate reads [B, C, H, W] feature maps or [B, N, C] token sequences"
            )
        self.gate = DynamicGate(channels, len(archs), reduction=reduction, hidden=hidden, tokens=tokens)
        self.train(net.training)  # one mode for the whole model: the wrapped net's

    # --- the Supernet contract: the backbone with the attention head at the cut ---------------
    def forward_stem(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        x = self.net.forward_stem(x, arch)
        return self.gate.attend(x) if self.cut == 0 else x

    def forward_stage(self, i: int, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        x = self.net.forward_stage(i, x, arch)
        return self.gate.attend(x) if i == self.cut - 1 else x

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self.net.forward_head(x, arch)

    def stage_dims(self, i: int) -> tuple[str, ...]:
        return self.net.stage_dims(i)

    def named_routes(self) -> dict[str, Arch]:
        """``{"route0": arch, ...}``, narrowest first: the names used in tables, JSON and metadata."""
        return {f"route{i}": a for i, a in enumerate(self.routes)}

    def spec(self) -> dict[str, Any]:
        """What rebuilds this gate (cut, routes as arch dicts, gate width): model files store it
        under ``model.gate``. Routes are written out, never recomputed on load, so a later change
        to :func:`routes_even` cannot change a trained gate."""
        return {
            "cut": self.cut_spec,
            "routes": [a.to_dict() for a in self.routes],
            "reduction": round(self.gate.channels / self.gate.hidden),
            "hidden": self.gate.hidden,
        }

    # --- Stage II and inference -------------------------------------------------------------
    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, logits)``: the attention-scaled features at the cut and the route logits."""
        return self.gate(self.net.forward_to(x, self.routes[0], self.cut))

    def forward_route(self, h: torch.Tensor, route: int) -> torch.Tensor:
        """The network after the gate, every sample of ``h`` on route ``route`` (negatives count
        from the widest)."""
        return self.net.forward_from(h, self.routes[route], self.cut)

    def forward_routes(self, h: torch.Tensor, route_index: torch.Tensor) -> torch.Tensor:
        """Sample ``i`` of ``h`` through route ``route_index[i]``; outputs in input order.

        Samples are grouped by route and each group runs densely with its route's slices; a
        route no sample takes costs nothing. Equal (to float rounding) to one call per sample.
        """
        check_route_index(route_index, h.shape[0])
        return run_grouped(h, route_index.cpu(), self.forward_route, len(self.routes))

    def forward_mixed(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Route outputs mixed by (straight-through one-hot) ``weights`` ``[B, n_routes]``.

        Sample ``i`` takes route ``r = argmax(weights[i])`` and returns ``weights[i, r] * y_r(h_i)``:
        the value of ``y_r(h_i)`` (the weight is 1 in the forward pass), and a gradient into the
        gate through ``weights[i, r]``. Routes no sample takes are not computed (their outputs
        would be multiplied by 0 anyway).
        """
        if weights.shape != (h.shape[0], len(self.routes)):
            raise ValueError(
                f"weights must have shape [{h.shape[0]}, {len(self.routes)}], got {tuple(weights.shape)}"
            )
        route_index = weights.argmax(1)
        out = self.forward_routes(h, route_index)
        w = weights.gather(1, route_index[:, None])  # [B, 1]
        return out * w.view(-1, *([1] * (out.dim() - 1)))

    def route_macs(self, input_size: Sequence[int] | None = None) -> torch.Tensor:
        """MACs per image of the dynamic net on each route (trunk + gate + rest), float64 ``[n_routes]``."""
        macs = count_macs(self.net, list(self.routes), input_size)
        return torch.tensor(macs, dtype=torch.float64) + self.gate.macs()

    def freeze_for_stage2(self, train_gate_trunk: bool = False) -> list[nn.Parameter]:
        """Stage II setup: everything frozen and in eval mode except the slimming head.

        Returns the parameters to optimise. ``train_gate_trunk=True`` also trains the gate's
        shared 1x1 conv; off by default because it also changes the attention scaling that the
        frozen supernet was trained with.
        """
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        trainable = list(self.gate.slimming.parameters())
        if train_gate_trunk:
            trainable += list(self.gate.reduce.parameters())
        for p in trainable:
            p.requires_grad_(True)
        return trainable


def check_route_index(route_index: torch.Tensor, n: int) -> None:
    """Raise unless ``route_index`` is a LongTensor of shape ``[n]`` (one route per sample)."""
    if route_index.shape != (n,) or route_index.dtype != torch.long:
        raise ValueError(
            f"route_index must be a LongTensor of shape [{n}], got {route_index.dtype} {tuple(route_index.shape)}"
        )


def _pinned_space(space: SearchSpace, fixed: Mapping[str, int]) -> SearchSpace:
    """``space`` with each dim of ``fixed`` reduced to its one value."""
    for group in space.tied:
        pinned = [n for n in group if n in fixed]
        if pinned and len(pinned) != len(group):
            raise ValueError(
                f"tied dimensions {list(group)} span the gate ({pinned} before it); "
                "move the gate so that a tied group lies entirely on one side"
            )
    dims = tuple(Dim(d.name, (fixed[d.name],), d.kind) if d.name in fixed else d for d in space.dims)
    return SearchSpace(dims, space.tied)


