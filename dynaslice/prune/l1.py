"""The baselines every pruning paper compares with: L1-norm filters, random channels, scratch.

- :func:`prune_l1` (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017): keep each
  group's filters with the largest L1 norm ``sum |W[c]|``, then fine-tune. A tied group (a ResNet
  stage's residual stream, ``include="all"``) must keep the same channels in every producer, so
  its score is the sum over producers of each layer's norms divided by that layer's mean norm
  (every layer counts equally, as NNCF and ModelOpt score tied channels); the paper itself prunes
  only the first conv of each residual block (``include="internal"``, the default).
- :func:`prune_random`: the same widths with channels drawn at random (is the criterion worth
  anything beyond the widths it gives?).
- :func:`train_from_scratch`: the same compact architecture, re-initialised and trained alone
  (is the pruned network's inheritance worth anything beyond its architecture?).

Widths come from ``widths`` (channels per group), or from ``target_macs`` / ``target_params``:
then every prunable group keeps the same fraction of its channels, the largest that fits.
Training (with ``cfg``) is a plain :class:`~dynaslice.train.ModelTrainer` run: fine-tuning in
``RUN/finetune`` for ``prune.finetune_epochs``, or, from scratch, ``RUN/train`` for ``train.epochs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import runs
from ..train.config import Config
from .common import (
    ChannelGroup,
    PruneResult,
    finish,
    keep_first,
    model_channel_groups,
    prune_channels,
    reinitialize,
    resolve_widths,
)
from .phases import finetune, run_phase
from .registry import PruneContext, register_pruner

__all__ = ["l1_scores", "l1_select", "prune_l1", "prune_random", "random_select", "train_from_scratch"]


def l1_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """One score per channel of ``group``: its filter's L1 norm (normalised and summed when tied)."""
    total = torch.zeros(group.size)
    for name in group.producers:
        w = model.get_submodule(name).weight.detach().float().cpu()
        norms = w.abs().flatten(1).sum(1)
        total += norms / norms.mean().clamp_min(1e-12) if len(group.producers) > 1 else norms
    return total


def l1_select(
    model: nn.Module, groups: Mapping[str, ChannelGroup], widths: Mapping[str, int]
) -> dict[str, list[int]]:
    """The ``widths[g]`` channels of largest L1 score in each group, in their original order."""
    keep = {}
    for name, w in widths.items():
        top = torch.topk(l1_scores(model, groups[name]), w).indices
        keep[name] = sorted(top.tolist())
    return keep


def random_select(
    groups: Mapping[str, ChannelGroup], widths: Mapping[str, int], seed: int = 0
) -> dict[str, list[int]]:
    """``widths[g]`` channels of each group drawn uniformly at random (seeded), in original order."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: sorted(torch.randperm(groups[name].size, generator=g)[:w].tolist())
        for name, w in widths.items()
    }


def _run(
    method: str,
    model: nn.Module,
    input_size: Sequence[int],
    select,
    widths: Mapping[str, int] | None,
    targets: tuple[int | None, int | None],
    include: str,
    cfg: Config | None,
    run_dir: str | Path | None,
    resume: bool,
    scratch_seed: int | None = None,
) -> PruneResult:
    gm, groups = model_channel_groups(model, input_size)
    widths = resolve_widths(gm, groups, input_size, include, widths, *targets)
    compact = prune_channels(gm, groups, select(gm, groups, widths))
    if scratch_seed is None:
        val = finetune(compact, cfg, run_dir, resume)
    else:
        val = run_phase(reinitialize(compact, scratch_seed), cfg, run_dir, runs.PRUNE_TRAIN, resume=resume)
    info = {"include": include, "target_macs": targets[0], "target_params": targets[1]}
    return finish(method, compact, input_size, widths, val, info)


def prune_l1(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    widths: Mapping[str, int] | None = None,
    target_macs: int | None = None,
    target_params: int | None = None,
    include: str = "internal",
    cfg: Config | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> PruneResult:
    """L1-norm filter pruning of a trained plain model, then fine-tuning (with ``cfg``).

    ``model`` is not modified. The result's network is a plain ``fx.GraphModule``.
    """
    targets = (target_macs, target_params)
    return _run("l1", model, input_size, l1_select, widths, targets, include, cfg, run_dir, resume)


def prune_random(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    widths: Mapping[str, int] | None = None,
    target_macs: int | None = None,
    target_params: int | None = None,
    include: str = "internal",
    seed: int = 0,
    cfg: Config | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> PruneResult:
    """Random channels (seeded) at the given widths or budget, then fine-tuning (with ``cfg``)."""
    select = lambda gm, groups, w: random_select(groups, w, seed)  # noqa: E731
    targets = (target_macs, target_params)
    return _run("random", model, input_size, select, widths, targets, include, cfg, run_dir, resume)


def train_from_scratch(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    widths: Mapping[str, int] | None = None,
    target_macs: int | None = None,
    target_params: int | None = None,
    include: str = "internal",
    seed: int = 0,
    cfg: Config | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> PruneResult:
    """The compact architecture (first channels of each group), freshly initialised (``seed``),
    trained alone for ``train.epochs`` (with ``cfg``, in ``RUN/train``)."""
    select = lambda gm, groups, w: keep_first(w)  # noqa: E731
    targets = (target_macs, target_params)
    return _run("scratch", model, input_size, select, widths, targets, include, cfg, run_dir, resume, seed)


def _arguments(ctx: PruneContext) -> dict[str, Any]:
    """The keywords the three baselines share, from the run's context."""
    return {"target_macs": ctx.target_macs, "target_params": ctx.target_params, "include": ctx.include,
            "cfg": ctx.cfg, "run_dir": ctx.run_dir, "resume": ctx.resume}  # fmt: skip


@register_pruner("l1", budget="channels", trains_base=True)
def _l1(ctx: PruneContext) -> PruneResult:
    return prune_l1(ctx.model, ctx.input_size, **_arguments(ctx))


@register_pruner("random", budget="channels", trains_base=True)
def _random(ctx: PruneContext) -> PruneResult:
    return prune_random(ctx.model, ctx.input_size, seed=ctx.cfg.train.seed, **_arguments(ctx))


@register_pruner("scratch", budget="channels", trains_base=False)
def _scratch(ctx: PruneContext) -> PruneResult:
    return train_from_scratch(ctx.model, ctx.input_size, seed=ctx.cfg.train.seed, **_arguments(ctx))
