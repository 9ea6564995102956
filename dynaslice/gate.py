"""The DS-Net dynamic gate: routes, the double-headed gate, Gumbel straight-through and SGS.

A gated supernet is a supernet cut in two at a stage boundary ``cut``:

- the **trunk** (stem and stages ``0..cut-1``) always runs at one fixed width, shared by every
  route, so the gate can be a plain, fixed-width module;
- the **gate** reads the trunk's output: a shared squeeze (global average pool -> 1x1 conv to
  ``R`` -> ReLU) feeds an *attention head* (1x1 conv ``R -> C`` -> sigmoid -> channel-wise scale,
  i.e. squeeze-and-excitation; trained in Stage I with the supernet) and a *slimming head* (1x1
  conv ``R -> n_routes``: logits over the routes; trained in Stage II);
- the **rest** (stages ``cut..`` and the head) runs with the chosen route's slices.

Stage II (gate training) is built from the pieces here::

    gated = GatedSupernet(net, routes=4)    # Stage I trains `gated` (attention head included)
    ...                                     # Stage I: the usual sandwich loop on gated(x, arch)
    params = gated.freeze_for_stage2()      # supernet frozen, BN eval; the slimming head learns
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    route_macs = gated.route_macs()
    for step, (x, y) in enumerate(batches):
        h, logits = gated.trunk(x)
        with torch.no_grad():
            targets = sgs_targets(gated.forward_route(h, 0), gated.forward_route(h, -1), y, len(gated.routes))
        weights = gumbel_routes(logits, anneal_tau(step, total_steps))
        out = gated.forward_mixed(h, weights)
        loss = gate_loss(logits, targets, out, y, weights, route_macs, target_macs=0.5)
        opt.zero_grad(); loss.total.backward(); opt.step()

Evaluation always routes by ``logits.argmax(1)``, without noise (see :mod:`dynaslice.dynamic`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models.base import Supernet
from .profile import count_macs, meta_copy
from .space import Arch, Dim, SearchSpace

ArchLike = Mapping[str, int]


# --------------------------------------------------------------------------- the gate module


class DynamicGate(nn.Module):
    """Double-headed gate of DS-Net on features ``[B, C, H, W]`` (or tokens ``[B, N, C]``).

    ``forward(x) -> (scaled_x, logits)``. Plain torch layers: the features before the gate have
    one fixed width for every route, so nothing here is sliced. For tokens (a ViT's stage
    output) the gate reads the class token ``x[:, 0]`` and scales the channels of every token.

    Cost: ``C*R + R*C + R*n_routes`` MACs per image (:meth:`macs`), independent of the image size.
    """

    def __init__(
        self,
        channels: int,
        routes: int,
        reduction: int = 4,
        hidden: int | None = None,
        tokens: bool = False,
    ):
        super().__init__()
        if routes < 2:
            raise ValueError(f"a gate needs at least 2 routes to choose from, got {routes}")
        if channels < 1 or reduction < 1:
            raise ValueError(f"DynamicGate: channels ({channels}) and reduction ({reduction}) must be >= 1")
        hidden = max(1, round(channels / reduction)) if hidden is None else hidden
        self.channels, self.routes, self.hidden, self.tokens = channels, routes, hidden, tokens
        self.reduce = nn.Conv2d(channels, hidden, 1)  # the shared trunk of both heads
        self.relu = nn.ReLU(inplace=True)
        self.attention = nn.Conv2d(hidden, channels, 1)
        self.slimming = nn.Conv2d(hidden, routes, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, routes={self.routes}, tokens={self.tokens}"

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        """The shared trunk: pooled (or class-token) features -> ``[B, R, 1, 1]``."""
        if self.tokens:
            pooled = x[:, 0, :, None, None]
        else:
            pooled = x.mean((2, 3), keepdim=True)
        return self.relu(self.reduce(pooled))

    def scale(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Attention head: ``x`` scaled channel-wise by ``sigmoid(attention(z))``."""
        s = torch.sigmoid(self.attention(z))  # [B, C, 1, 1]
        if self.tokens:
            s = s.flatten(1)[:, None, :]  # [B, 1, C]: every token, same channel scale
        return x * s

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Attention head only (Stage I: the slimming head is not computed, so it has no unused
        parameters in a DDP step)."""
        return self.scale(x, self.squeeze(x))

    def route_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The slimming head: route logits ``[B, n_routes]`` from the squeezed features ``z``."""
        return self.slimming(z).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.squeeze(x)
        return self.scale(x, z), self.route_logits(z)

    def macs(self) -> int:
        """MACs per image of a full gate call (both heads), as torch's FLOP counter counts them."""
        return self.channels * self.hidden + self.hidden * self.channels + self.hidden * self.routes


# --------------------------------------------------------------------------- where the gate sits


def _middle(net: Supernet) -> int:
    return net.n_stages // 2


def _first_sliced_stage(net: Supernet) -> int:
    """The first stage that reads a dimension with more than one choice (DS-MBNet: s3)."""
    for i in range(net.n_stages):
        if any(len(net.space[d].choices) > 1 for d in net.stage_dims(i)):
            return i
    raise ValueError(f"{type(net).__name__} has no sliced stage to put a gate before")


def _first_quarter(net: Supernet) -> int:
    return max(1, net.n_stages // 4)


# Family class name -> rule giving the default cut (the gate sits before stage `cut`).
# DS-MBNet: the paper places it in the first block of s3; we use the stage boundary before s3
# (a cut inside a stage is not part of the Supernet contract). ResNet / MobileNetV2: after the
# middle stage. ViT: after the first quarter of the blocks.
DEFAULT_CUTS: dict[str, Callable[[Supernet], int]] = {
    "DSResNet": _middle,
    "DSMobileNetV2": _middle,
    "DSMobileNetV1": _middle,
    "DSMBNet": _first_sliced_stage,
    "DSViT": _first_quarter,
}


def default_cut(net: Supernet) -> int:
    """The default gate position of ``net``'s family (see ``DEFAULT_CUTS``)."""
    rule = DEFAULT_CUTS.get(type(net).__name__)
    if rule is None:
        raise ValueError(
            f"no default gate position for {type(net).__name__}; pass cut=<stage index> "
            f"(0..{net.n_stages - 1}) or add the family to dynaslice.gate.DEFAULT_CUTS"
        )
    return rule(net)


def _check_cut(net: Supernet, cut: int) -> None:
    if not 0 <= cut < net.n_stages:
        raise ValueError(
            f"gate cut {cut} is outside 0..{net.n_stages - 1}: the gate sits before one of the "
            f"{net.n_stages} stages of {type(net).__name__}"
        )


# --------------------------------------------------------------------------- routes


def validate_routes(
    net: Supernet, routes: Sequence[ArchLike], cut: int, input_size: Sequence[int] | None = None
) -> list[Arch]:
    """``routes`` as Archs of ``net``, checked: >= 2, the same pre-gate dims, strictly increasing MACs."""
    _check_cut(net, cut)
    archs = [net.space.validate(r) for r in routes]
    if len(archs) < 2:
        raise ValueError(f"a gate needs at least 2 routes, got {len(archs)}")
    fixed = net.dims_before(cut)
    for i, a in enumerate(archs[1:], 1):
        differ = {d: (archs[0][d], a[d]) for d in fixed if a[d] != archs[0][d]}
        if differ:
            raise ValueError(
                f"route {i} differs from route 0 before the gate (cut {cut}) in {differ}; "
                "layers before the gate run at one width shared by every route"
            )
    macs = [int(m) for m in count_macs(net, archs, input_size)]
    for i in range(1, len(archs)):
        if macs[i] <= macs[i - 1]:
            raise ValueError(
                f"routes must be distinct and sorted by MACs (narrowest first); route {i} has "
                f"{macs[i]} MACs after route {i - 1} with {macs[i - 1]}"
            )
    return archs


def routes_even(
    net: Supernet,
    k: int,
    cut: int,
    pre_gate: Mapping[str, int] | None = None,
    input_size: Sequence[int] | None = None,
) -> list[Arch]:
    """The default routing space: ``k`` archs with MACs spread evenly from smallest to largest.

    Candidates are the uniform-width archs ``net.space.uniform(r)`` (every width dim at the same
    ratio; kernel/depth at max), with the dims before the gate (``net.dims_before(cut)``) set to
    ``pre_gate`` -- by default their largest values; a partial mapping leaves the rest at their
    largest. Route ``j`` is the candidate nearest to ``min + j * (max - min) / (k - 1)`` MACs
    (order kept, no repeats); the first and last are the narrowest and widest candidates.
    """
    _check_cut(net, cut)
    if k < 2:
        raise ValueError(f"a gate needs at least 2 routes, got k={k}")
    space = net.space
    before = net.dims_before(cut)
    pre_gate = dict(pre_gate or {})
    extra = sorted(set(pre_gate) - set(before))
    if extra:
        raise ValueError(
            f"pre_gate names {extra}, which are not before the gate at cut {cut}: {list(before)}"
        )
    largest = space.largest()
    fixed = {d: pre_gate.get(d, largest[d]) for d in before}

    ratios = sorted({c / dim.max for dim in space.dims if dim.kind == "width" for c in dim.choices})
    candidates = list(dict.fromkeys(Arch({**space.uniform(r).to_dict(), **fixed}) for r in ratios))
    candidates = [space.validate(a) for a in candidates]
    macs = [int(m) for m in count_macs(net, candidates, input_size)]
    by_macs: dict[int, Arch] = {}
    for m, a in sorted(zip(macs, candidates, strict=True), key=lambda t: t[0]):
        by_macs.setdefault(m, a)  # equal MACs: keep the first (narrowest ratio) of them
    values, archs = list(by_macs), list(by_macs.values())
    if len(values) < k:
        raise ValueError(
            f"only {len(values)} distinct uniform-width routes exist after the gate at cut {cut}; "
            f"ask for k <= {len(values)} or pass explicit routes"
        )
    lo, hi = values[0], values[-1]
    picks = [0]
    for j in range(1, k - 1):
        target = lo + j * (hi - lo) / (k - 1)
        # stay strictly after the previous pick and leave room for the remaining picks
        allowed = range(picks[-1] + 1, len(values) - (k - 1 - j))
        picks.append(min(allowed, key=lambda i: abs(values[i] - target)))
    picks.append(len(values) - 1)
    return [archs[i] for i in picks]


# --------------------------------------------------------------------------- the gated supernet


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
    (:func:`validate_routes`). ``cut`` defaults to the family's entry in ``DEFAULT_CUTS``.
    """

    def __init__(
        self,
        net: Supernet,
        cut: int | None = None,
        routes: int | Sequence[ArchLike] = 4,
        pre_gate: Mapping[str, int] | None = None,
        reduction: int = 4,
        hidden: int | None = None,
    ):
        super().__init__()
        cut = default_cut(net) if cut is None else cut
        if isinstance(routes, int):
            archs = routes_even(net, routes, cut, pre_gate)
        else:
            if pre_gate is not None:
                raise ValueError("pass pre_gate only with routes=<int>; explicit routes already fix it")
            archs = validate_routes(net, routes, cut)
        self.net, self.cut, self.routes = net, cut, tuple(archs)
        self.num_classes, self.n_stages, self.input_size = net.num_classes, net.n_stages, net.input_size
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
        if route_index.shape != (h.shape[0],) or route_index.dtype != torch.long:
            raise ValueError(
                f"route_index must be a LongTensor of shape [{h.shape[0]}], got "
                f"{route_index.dtype} {tuple(route_index.shape)}"
            )
        present = route_index.unique().tolist()  # sorted
        if present and not (0 <= present[0] and present[-1] < len(self.routes)):
            raise ValueError(f"route indices {present} outside 0..{len(self.routes) - 1}")
        if len(present) == 1:  # the whole batch (always so at batch 1) on one route: no copies
            return self.forward_route(h, present[0])
        out: torch.Tensor | None = None
        for r in present:
            idx = (route_index == r).nonzero().squeeze(1)
            y = self.forward_route(h.index_select(0, idx), r)
            if out is None:
                out = y.new_empty((h.shape[0], *y.shape[1:]))
            out.index_copy_(0, idx, y)
        if out is None:
            raise ValueError("forward_routes got an empty batch")
        return out

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


# --------------------------------------------------------------------------- Gumbel routing


def gumbel_routes(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Training-time route weights: straight-through Gumbel-softmax, one-hot in the forward pass.

    Uses the global torch RNG (seed it for reproducibility). Never use this at evaluation:
    there a route is ``logits.argmax(1)``.
    """
    if tau <= 0:
        raise ValueError(f"Gumbel temperature must be > 0, got {tau}")
    return F.gumbel_softmax(logits, tau=tau, hard=True)


def anneal_tau(step: int, total_steps: int, start: float = 1.0, end: float = 0.1) -> float:
    """Exponentially annealed Gumbel temperature: ``start`` at step 0 to ``end`` at ``total_steps``.

    High early (soft, exploratory routing gradients), low late (the soft sample approaches the
    hard one-hot decision that evaluation takes). Clamped to ``end`` beyond ``total_steps``.
    """
    if start <= 0 or end <= 0 or total_steps < 1:
        raise ValueError(
            f"anneal_tau needs start, end > 0 and total_steps >= 1 (got {start}, {end}, {total_steps})"
        )
    t = min(max(step, 0), total_steps) / total_steps
    return start * math.exp(t * math.log(end / start))


# --------------------------------------------------------------------------- SGS loss


def sgs_targets(
    smallest_logits: torch.Tensor,
    largest_logits: torch.Tensor,
    labels: torch.Tensor,
    n_routes: int,
    drop_hopeless: bool = False,
) -> torch.Tensor:
    """Sandwich Gate Sparsification targets: a route index per sample.

    *Easy* (the narrowest route classifies it correctly) -> route 0. *Hard* -> the widest route,
    ``n_routes - 1``. *Hopeless* (the widest route is wrong too): hard by default, or ``-100``
    (ignored by the gate's cross-entropy) with ``drop_hopeless=True``.
    """
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(
            f"sgs_targets needs integer class labels of shape [B], got {labels.dtype} {tuple(labels.shape)}"
        )
    easy = smallest_logits.argmax(1) == labels
    targets = torch.where(easy, 0, n_routes - 1)
    if drop_hopeless:
        hopeless = ~easy & (largest_logits.argmax(1) != labels)
        targets = targets.masked_fill(hopeless, -100)
    return targets


def calibrate_route_bias(
    logits: torch.Tensor, route_macs: torch.Tensor, target_macs: float, iters: int = 60
) -> torch.Tensor:
    """The route bias ``delta * cost`` that makes argmax routing spend at most ``target_macs``.

    Why: the MACs penalty of Stage II acts on the *expected* MACs of the Gumbel samples, and when
    the gate's per-sample evidence is weak it is cheaper for the loss to move every sample the
    same way, so a raw argmax often lands all images on one route, far from the target.
    Shifting every route's logit by ``delta`` times its normalised cost keeps the gate's
    ranking of the samples (which images look hard) and only moves the operating point: the
    route chosen for each sample, and so the average MACs, is non-decreasing in ``delta``. We
    bisect for the largest routing whose average MACs on ``logits`` (held-out data, the
    slimming head's logits ``[N, n_routes]``) does not exceed ``target_macs`` (absolute MACs),
    and return the ``delta`` in the middle of the interval that gives exactly that routing, so
    float rounding in the model cannot flip a sample at the edge.
    Returns the shift ``[n_routes]`` (float32); adding it to the slimming head's bias makes it
    part of the model, so every runtime (PyTorch, exported, ONNX) routes alike.
    """
    if logits.dim() != 2 or logits.shape[1] != len(route_macs) or len(logits) == 0:
        raise ValueError(
            f"calibrate_route_bias needs logits [N>0, {len(route_macs)}], got {tuple(logits.shape)}"
        )
    logits = logits.detach().double()
    macs = route_macs.detach().double().to(logits.device)
    cost = (macs - macs.min()) / (macs.max() - macs.min()).clamp_min(1e-12)

    def routes(delta: float) -> torch.Tensor:
        return (logits + delta * cost).argmax(1)

    def spent(delta: float) -> float:
        return float(macs[routes(delta)].mean())

    def bisect(lo: float, hi: float, ok) -> tuple[float, float]:  # noqa: ANN001
        """``ok(lo)`` holds, ``ok(hi)`` does not: narrow down to the switch point."""
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo, hi

    # Beyond +-span the cheapest / the most expensive route wins for every sample: the bias must
    # outweigh any logit gap even between the two routes closest in cost.
    gaps = cost.unique().diff()
    span = (2 * float(logits.abs().max()) + 1.0) / float(gaps.min() if len(gaps) else 1.0)
    if spent(span) <= target_macs:  # even all-widest fits the budget
        delta = span
    elif spent(-span) > target_macs:  # not even all-narrowest fits: the cheapest routing there is
        delta = -span
    else:
        within, upper = bisect(-span, span, lambda d: spent(d) <= target_macs)  # upper: over budget
        chosen = routes(within)
        lower, _ = bisect(-span, upper, lambda d: not torch.equal(routes(d), chosen))
        delta = (lower + upper) / 2 if not torch.equal(routes(-span), chosen) else upper - 1.0
    return (delta * cost).float()


def resolve_target_macs(target_macs: float, route_macs: torch.Tensor) -> float:
    """Absolute target MACs: ``target_macs <= 1`` is a fraction of the widest route's MACs."""
    lo, hi = float(route_macs.min()), float(route_macs.max())
    absolute = target_macs * hi if 0 < target_macs <= 1 else float(target_macs)
    if not lo <= absolute <= hi:
        raise ValueError(
            f"target MACs {absolute:.4g} cannot be reached: the routes cost {lo:.4g}..{hi:.4g} MACs "
            f"(as a fraction of the widest: {lo / hi:.3f}..1)"
        )
    return absolute


@dataclass
class GateLoss:
    """The Stage-II loss and its parts (``total`` is what to backpropagate)."""

    total: torch.Tensor
    gate_ce: torch.Tensor
    task_ce: torch.Tensor
    complexity: torch.Tensor
    expected_macs: torch.Tensor

    def log(self) -> dict[str, float]:
        """Plain floats for a metrics line."""
        return {k: float(v.detach()) for k, v in vars(self).items()}


def gate_loss(
    gate_logits: torch.Tensor,
    targets: torch.Tensor,
    outputs: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    route_macs: torch.Tensor,
    target_macs: float | None,
    gate_weight: float = 1.0,
    task_weight: float = 1.0,
    macs_weight: float = 10.0,
) -> GateLoss:
    """SGS loss: ``CE(gate_logits, targets) + CE(outputs, labels) + lambda * ((E[MACs] - T) / max)^2``.

    - ``gate_logits`` ``[B, n_routes]``: raw slimming-head logits; the CE applies the one softmax
      (the original code applied softmax twice). Targets ``-100`` are ignored.
    - ``outputs``: class logits of the routes taken, from :meth:`GatedSupernet.forward_mixed`
      with the same ``weights``: the task CE reaches the gate through them.
    - ``E[MACs]``: batch mean of ``weights @ route_macs``. With straight-through weights its value
      is the MACs actually spent and its gradient flows through the soft sample; pass
      ``softmax(gate_logits)`` as ``weights`` for a fully soft estimate.
    - ``target_macs``: the one knob for the S/M/L operating points: a fraction (``<= 1``) of the
      widest route's MACs, or absolute MACs; ``None`` disables the term (plain SGS).
      ``macs_weight`` (lambda) defaults to 10 so that a 20% miss pulls about as hard as the gate
      CE (untuned: tune it per task).
    """
    gate_ce = (
        F.cross_entropy(gate_logits, targets, ignore_index=-100)
        if bool((targets != -100).any())
        else gate_logits.sum() * 0.0  # every sample ignored: no gate target in this batch
    )
    task_ce = F.cross_entropy(outputs, labels)
    route_macs = route_macs.to(weights.device, weights.dtype)
    expected = (weights * route_macs).sum(1).mean()
    if target_macs is None:
        complexity = expected * 0.0
    else:
        target = resolve_target_macs(target_macs, route_macs)
        complexity = ((expected - target) / route_macs.max()) ** 2
    total = gate_weight * gate_ce + task_weight * task_ce + macs_weight * complexity
    return GateLoss(total, gate_ce, task_ce, complexity, expected)
