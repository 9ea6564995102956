"""Stage II's training signal: straight-through Gumbel routing, Sandwich Gate Sparsification
(SGS) targets, the gate loss with its MACs penalty, and the post-training calibration of the
route bias that puts argmax routing at a MACs target."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
