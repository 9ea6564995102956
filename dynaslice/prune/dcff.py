"""DCFF: dynamic-coded filter fusion (Lin et al., "Training Compact CNNs for Image Classification
using Dynamic-coded Filter Fusion", TPAMI 2023; code ``lmbxmu/DCFF``).

Each pruned conv keeps its full bank of ``C`` filters ``W`` but outputs ``m`` *fused* filters
``P_S @ W``: row ``j`` of ``P = softmax(-T * D)`` (``D`` the pairwise Euclidean distances between
filters) is filter ``j``'s inter-similarity distribution, and ``S`` are the ``m`` filters that
differ most from the others, scored by ``sum_k KL(P_j || P_k)``. Before every epoch the
temperature ``T`` grows (the official schedule: ``T(e) = A / (1 + exp(-k e)) + T_s - A / 2`` with
``A = 2 (T_e - T_s) (1 + exp(-k E)) / (1 - exp(-k E))``, ``T_s = 1``, ``T_e = 1e4``, ``k = 1``; so
``T(0) = T_s``, ``T(E) = T_e``), ``P`` and ``S`` are recomputed from the current weights and
frozen until the next update; gradients reach all of ``W`` through the fixed ``P``. As ``T`` grows
``P`` becomes one-hot and the fused filters become plain filters. The network trains from scratch
(pass an untrained model) on the engine (:class:`DCFFTrainer`); at the end every fused conv
becomes an ``nn.Conv2d`` holding ``P_S @ W``, which computes exactly what the fused network
computed.

**Schedule and budget.** The official runs are 300 (CIFAR) or 90 (ImageNet) epochs, so the
first epoch at ``T = 1`` -- where a fresh filter's fused version is close to the average filter
and the network learns slowly -- is under 1.2% of training. In a run of one or two epochs it is
half or all of it. ``updates_per_epoch`` (default 1, official) recomputes ``P`` and ``S`` that
many times per epoch at evenly spaced steps, with ``T`` taken at the fractional epoch; with
``k = updates_per_epoch = S / E`` the official ``S``-epoch schedule is compressed into a run of
``E`` epochs (the same temperature at the same fraction of training). docs/PRUNING.md records
what that does at our budget.

Layers: every conv whose output group is pruned, as the official ResNets do (``include="all"``:
block-inner widths and each stage's residual stream, the stem included; the tied producers of a
residual stream are fused independently, since the compact residual add only needs equal widths).

Departures from the official code, and why:

- **Scores in log space.** The official code computes ``KL`` from ``P`` with ``log(P_j / (P_k +
  1e-7))``. From the second epoch on ``T`` is in the thousands, ``P`` underflows to exact one-hot
  rows, every filter gets the same score and the top-``m`` choice falls to ``topk``'s tie-breaking:
  the criterion stops working. We compute ``log P`` with ``log_softmax`` (float64), so the scores
  stay finite and ordered at any temperature (as ``T`` grows they tend to ``T`` times the summed
  distances of a filter to the others -- still "keep the filters least like the rest", which is
  the paper's intent). The official mean over the distribution's entries is a sum here (a constant
  factor, same ranking).
- **Stable output slots.** The official code takes ``topk(..., sorted=False)``, whose order is
  unspecified, so output channel ``i`` (and the BatchNorm and next layer reading it) may switch to
  another filter between epochs even when the kept set did not change. We keep each kept filter
  in its slot and put newly chosen filters in the slots freed by dropped ones.
- The official ImageNet ResNet builds the downsample projections directly at compact width; we
  fuse them like every other pruned conv (the CIFAR code's rule: every pruned conv is fused).
- Its scores are kept from the previous epoch when they are not finite; ours always are.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import runs
from ..train.config import Config
from ..train.model import ModelTrainer
from .common import (
    PruneResult,
    PruningError,
    _set_module,
    finish,
    model_channel_groups,
    prune_channels,
    resolve_widths,
)
from .phases import fit
from .registry import PruneContext, register_pruner

__all__ = [
    "DCFFTrainer",
    "FusedConv2d",
    "dcff_scores",
    "dcff_train",
    "fuse_model",
    "temperature",
    "to_compact",
    "update_fusion",
]


def temperature(
    epoch: float, epochs: float, t_start: float = 1.0, t_end: float = 1e4, k: float = 1.0
) -> float:
    """DCFF's temperature at (fractional) ``epoch`` of ``epochs``: ``t_start`` at 0, rising along a
    logistic curve of steepness ``k`` per epoch to ``t_end`` at ``epochs``."""
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    a = 2 * (t_end - t_start) * (1 + math.exp(-k * epochs)) / (1 - math.exp(-k * epochs))
    return a / (1 + math.exp(-k * epoch)) + t_start - a / 2


def dcff_scores(weight: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, scores)`` of one filter bank ``[C, ...]`` at temperature ``temp`` (float64).

    ``P[j] = softmax_i(-temp * ||W_j - W_i||)``; ``scores[j] = sum_k KL(P_j || P_k)``.
    """
    w = weight.detach().flatten(1).double()
    log_p = torch.log_softmax(-temp * torch.cdist(w, w), dim=1)
    p = log_p.exp()
    # KL(P_j || P_k) = sum_i P_ji log P_ji - sum_i P_ji log P_ki
    kl = (p * log_p).sum(1, keepdim=True) - p @ log_p.T
    return p, kl.sum(1)


def _assign_slots(previous: list[int] | None, chosen: list[int]) -> list[int]:
    """Output slot -> filter: kept filters stay in their slots, newcomers fill the freed ones."""
    if previous is None:
        return sorted(chosen)
    chosen_set = set(chosen)
    newcomers = iter(sorted(chosen_set - set(previous)))
    return [f if f in chosen_set else next(newcomers) for f in previous]


class FusedConv2d(nn.Module):
    """A conv that keeps all ``C`` filters (``self.conv``, an ordinary ``nn.Conv2d``, so it is
    optimised and weight-decayed like any conv) and outputs ``m`` fused ones: ``conv(x, P @ W)``.

    ``fusion`` (``P`` restricted to the kept filters, ``[m, C]``) and ``slots`` (the filter behind
    each output) are buffers set by :func:`update_fusion` and saved with checkpoints; they start
    as the first ``m`` filters.
    """

    def __init__(self, conv: nn.Conv2d, m: int):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise PruningError("DCFF fuses ordinary convs only (groups=1, zero padding)")
        if not 1 <= m <= conv.out_channels:
            raise PruningError(f"cannot fuse {conv.out_channels} filters into {m}")
        self.conv = copy.deepcopy(conv)
        self.register_buffer("fusion", torch.eye(conv.out_channels, dtype=conv.weight.dtype)[:m].clone())
        self.register_buffer("slots", torch.full((m,), -1, dtype=torch.long))  # -1: never chosen yet

    @property
    def out_channels(self) -> int:
        return self.fusion.shape[0]

    def fused(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.conv.weight, self.conv.bias
        fw = (self.fusion @ w.flatten(1)).view(self.out_channels, *w.shape[1:])
        return fw, None if b is None else self.fusion @ b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.fused()
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation)

    def to_conv(self) -> nn.Conv2d:
        """The plain conv computing the same output with the current fused weights."""
        w, b = self.fused()
        c = self.conv
        conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), c.stride, c.padding, c.dilation,
                         bias=b is not None, device=w.device, dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        return conv.train(self.training)


@torch.no_grad()
def update_fusion(model: nn.Module, temp: float) -> None:
    """DCFF's update at temperature ``temp``: new scores, kept filters and ``P`` for every fused
    conv of ``model``, from its current weights."""
    for m in model.modules():
        if isinstance(m, FusedConv2d):
            p, scores = dcff_scores(m.conv.weight, temp)
            chosen = torch.topk(scores, m.out_channels).indices.tolist()
            previous = None if int(m.slots[0]) < 0 else m.slots.tolist()
            slots = _assign_slots(previous, chosen)
            m.slots.copy_(torch.tensor(slots))
            m.fusion.copy_(p[slots].to(m.fusion.dtype))


def fuse_model(model: nn.Module, input_size: Sequence[int], widths: Mapping[str, int]) -> fx.GraphModule:
    """A copy of ``model`` in which each pruned group's producers are :class:`FusedConv2d` with
    ``widths[g]`` outputs and every norm and consumer is already compact."""
    gm, groups = model_channel_groups(model, input_size)
    widths = resolve_widths(gm, groups, input_size, widths=widths)
    fused = prune_channels(gm, groups, {g: range(w) for g, w in widths.items()}, producers=False)
    for g, w in widths.items():
        for name in groups[g].producers:
            conv = fused.get_submodule(name)
            if not isinstance(conv, nn.Conv2d):
                raise PruningError(f"DCFF fuses conv filters; {name!r} is a {type(conv).__name__}")
            _set_module(fused, name, FusedConv2d(conv, w).train(conv.training))
    return fused


def to_compact(fused: fx.GraphModule) -> fx.GraphModule:
    """The fused network as a plain one: every :class:`FusedConv2d` becomes its ``nn.Conv2d``."""
    out = copy.deepcopy(fused)  # the fused network stays usable
    for name, m in list(fused.named_modules()):
        if isinstance(m, FusedConv2d):
            _set_module(out, name, m.to_conv())
    return out


class DCFFTrainer(ModelTrainer):
    """Trains a fused network (:func:`fuse_model`): labels CE, and before every ``steps_per_epoch
    / updates_per_epoch`` steps the fusion update at the temperature of that fractional epoch.

    The update runs at the start of its step, from the weights of that moment: a run resumed
    between updates keeps the ``P`` and ``S`` its checkpoint holds (they are buffers of the
    model), so it continues exactly as the uninterrupted run.
    """

    def __init__(self, fused: nn.Module, cfg: Config, run_dir: str | Path, epochs: float | None = None, *,
                 t_start: float = 1.0, t_end: float = 1e4, k: float = 1.0, updates_per_epoch: int = 1):  # fmt: skip
        super().__init__(fused, cfg, run_dir, epochs)
        if updates_per_epoch < 1:
            raise ValueError(f"updates_per_epoch must be >= 1, got {updates_per_epoch}")
        self.schedule = {"t_start": t_start, "t_end": t_end, "k": k}
        self.interval = max(1, round(self.steps_per_epoch / updates_per_epoch))

    def temperature_at(self, step: int) -> float:
        spe = self.steps_per_epoch
        return temperature(step / spe, self.total_steps / spe, **self.schedule)

    def update_steps(self) -> list[int]:
        """The steps that start with a fusion update."""
        return list(range(0, self.total_steps, self.interval))

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        if self.step % self.interval == 0:
            update_fusion(self.model, self.temperature_at(self.step))
        return super().forward_backward(x, y)


def dcff_train(
    model: nn.Module,
    input_size: Sequence[int],
    cfg: Config,
    run_dir: str | Path,
    *,
    widths: Mapping[str, int] | None = None,
    target_macs: int | None = None,
    target_params: int | None = None,
    include: str = "all",
    t_start: float = 1.0,
    t_end: float = 1e4,
    k: float = 1.0,
    updates_per_epoch: int = 1,
    resume: bool = False,
) -> PruneResult:
    """Train a compact network with DCFF from ``model`` (untrained, as in the paper); one call.

    The budget is ``widths`` or a uniform keep ratio meeting ``target_macs``/``target_params``
    over the groups in ``include``. Trains ``train.epochs`` epochs of ``cfg`` in ``RUN/train``
    (``model`` itself is not changed). Returns the plain compact network with the fused weights.
    """
    gm, groups = model_channel_groups(model, input_size)
    widths = resolve_widths(gm, groups, input_size, include, widths, target_macs, target_params)
    fused = fuse_model(gm, input_size, widths)
    trainer = DCFFTrainer(fused, cfg, Path(run_dir) / runs.PRUNE_TRAIN, t_start=t_start, t_end=t_end, k=k,
                          updates_per_epoch=updates_per_epoch)  # fmt: skip
    val = fit(trainer, resume)
    temps = [trainer.temperature_at(s) for s in trainer.update_steps()]
    info = {
        "include": include, "target_macs": target_macs, "target_params": target_params,
        "schedule": {**trainer.schedule, "updates_per_epoch": updates_per_epoch, "updates": len(temps),
                     "first_temperatures": temps[:3], "last_temperature": temps[-1]},
    }  # fmt: skip
    return finish("dcff", to_compact(trainer.model), input_size, widths, val, info)


SLOW_START = 0.05
"""Share of DCFF's training at its first temperature above which ``prune`` says so (the paper: 1
of 300 epochs, 0.3%; the official schedule in a one-epoch run: all of it, 54% against 88% val
top-1 in docs/PRUNING.md)."""


def slow_start_note(cfg: Config) -> str | None:
    """Advice when DCFF would spend much of its budget at ``T = t_start``, where the fused filters
    are close to the average filter and the network learns slowly: the first fusion update holds
    for ``1 / updates_per_epoch`` epochs."""
    epochs = cfg.train.epochs
    share = min(1.0, 1 / (cfg.prune.updates_per_epoch * epochs))
    if share <= SLOW_START:
        return None
    scaled = max(1, round(300 / epochs))
    return (
        f"DCFF keeps its first temperature for {share:.0%} of this {epochs:g}-epoch run "
        f"(the paper: 0.3%), where it learns slowly; --set prune.k={scaled} "
        f"--set prune.updates_per_epoch={scaled} compresses the official schedule into it (docs/PRUNING.md)"
    )


@register_pruner("dcff", budget="channels", trains_base=False, include="all", note=slow_start_note)
def _dcff(ctx: PruneContext) -> PruneResult:
    p = ctx.cfg.prune
    return dcff_train(ctx.model, ctx.input_size, ctx.cfg, ctx.run_dir, target_macs=ctx.target_macs,
                      target_params=ctx.target_params, include=ctx.include, t_start=p.t_start, t_end=p.t_end,
                      k=p.k, updates_per_epoch=p.updates_per_epoch, resume=ctx.resume)  # fmt: skip
