"""White-Box channel pruning (Zhang et al., "Carrying out CNN Channel Pruning in a White Box",
TNNLS 2022; code ``zyxxmu/White-Box``).

1. **Class-wise masks.** Every block-internal channel group gets a mask ``M`` of shape
   ``[classes, C]`` (ones at first), trained together with the network: a sample of class ``y``
   scales channel ``c`` by ``sum_k r_k M[k, c]`` with ``r_y = 1`` and ``r_k ~ U[0, 1)`` for the
   other classes, drawn afresh per sample and step (the official ``Gaussian_select``, despite its
   name, draws ``torch.rand``). Loss: cross-entropy ``+ lambda * sum_layers || sum_k M[k] ||_2``.
   The masked network takes the labels as a second input (:func:`add_class_masks`).
2. **Global vote.** A channel's score is ``|sum_k M[k, c]|``. One threshold over all masked
   channels keeps the highest scores; a layer left with fewer than ``int(min_keep * C)`` channels
   (official ``--min_preserve 0.3``) keeps its top ``int(min_keep * C)`` instead. The threshold is
   lowered (fewer channels kept) until the compact network's MACs meet the target.
3. **Fine-tuning** of the compact network (masks dropped, kept weights copied).

Defaults follow the official ImageNet ResNet-50 recipe (the one ResNet setting that uses the
regulariser): ``lambda = 5e-4``, masks on every block-internal width. The network trains with its
masks from scratch in the official code (pass an untrained model for that; a trained one works too),
on the engine (:class:`WhiteBoxTrainer`: the regulariser is its loss term).

Departures from the official code, and why:

- **Mask position.** The CIFAR ResNets scale a block's first conv output *before* its BatchNorm;
  in training mode BatchNorm divides a per-channel scale back out, so only the class-dependent
  part of the mask affects anything. We place the mask where the official ImageNet ResNet-50 does
  and where it is a channel's contribution to the next layer: after the activation, at the
  consumer conv's input.
- **Exact threshold.** The official code lowers a preserve fraction from 90% in 1% steps until the
  FLOPs target is met, overshooting by up to a step. We bisect the number of globally preserved
  channels (MACs are monotone in it), landing on the largest network within the target. Ties in
  score are broken by position, so equal scores cannot keep more channels than the vote allows.
- **Masks are not folded into the pruned network.** The official code multiplies the pruned
  BatchNorm's weight and bias by half the class-summed mask. That does not reproduce the masked
  network (a pre-BN scale is not a post-BN one, and at test time there is no label); the
  compact network keeps its trained weights and fine-tuning does the rest.
- The official VGG and MobileNetV2 builders keep *random* channels of their last layers (and
  fill the classifier's columns from ``torch.randn`` placeholders); for ResNets they keep the
  residual stream whole, which is what we do: only block-internal widths are pruned.
- A target the vote cannot reach (every layer at its minimum) is an error, not an endless loop,
  raised before any training (:func:`vote_floor`).
- The masks are not weight-decayed (the project decays conv and linear weights only; the official
  code decays every parameter). Decay shrinks all masks by the same factor per step, which leaves
  the ranking of the scores ``|sum_k M[k, c]|`` unchanged up to the gradient's share.
- The loss uses the config's label smoothing, as every network of a comparison does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import runs
from ..train.config import Config
from ..train.model import ModelTrainer
from .common import (
    ChannelGroup,
    CostModel,
    PruneResult,
    PruningError,
    finish,
    model_channel_groups,
    prunable_groups,
    prune_channels,
)
from .phases import finetune, fit, pretrain_epochs
from .registry import PruneContext, register_pruner

__all__ = [
    "ClassMask",
    "WhiteBoxTrainer",
    "add_class_masks",
    "global_vote",
    "mask_regularizer",
    "mask_scores",
    "strip_class_masks",
    "vote_floor",
    "whitebox_prune",
]

_PREFIX = "whitebox_mask_"


class ClassMask(nn.Module):
    """Scale each channel by a class-dependent factor: ``x * (r @ M)[:, :, None, None]``.

    Training: ``r`` is one at the sample's class and ``U[0, 1)`` elsewhere (fresh each call, from
    torch's global generator). Eval: ``r`` is the one-hot class, so the output is deterministic.
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(num_classes, channels))

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        k = self.mask.shape[0]
        onehot = F.one_hot(targets, k).to(x.dtype)
        if self.training:
            mix = torch.rand(len(targets), k, device=x.device, dtype=x.dtype)
            mix = torch.where(onehot.bool(), onehot, mix)
        else:
            mix = onehot
        scale = mix @ self.mask
        return x * scale.view(*scale.shape, *([1] * (x.dim() - 2)))


def _mask_name(group: str) -> str:
    return _PREFIX + group.replace(".", "_")


def add_class_masks(
    model: nn.Module, input_size: Sequence[int], num_classes: int, include: str = "internal"
) -> fx.GraphModule:
    """A copy of ``model`` with a :class:`ClassMask` at the input of each pruned group's consumers.

    Its forward is ``forward(x, targets)``. :func:`strip_class_masks` gives back the plain network.
    """
    gm, groups = model_channel_groups(model, input_size)
    masked = copy.deepcopy(gm)
    graph = masked.graph
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    x = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(x):
        targets = graph.placeholder("targets")
    for name in prunable_groups(groups, include):
        group = groups[name]
        masked.add_submodule(_mask_name(name), ClassMask(group.size, num_classes))
        inputs = {nodes[c].args[0] for c in group.consumers}
        for inp in inputs:
            with graph.inserting_after(inp):
                node = graph.call_module(_mask_name(name), (inp, targets))
            for c in group.consumers:
                if nodes[c].args[0] is inp:
                    nodes[c].args = (node, *nodes[c].args[1:])
    graph.lint()
    masked.recompile()
    return masked


def strip_class_masks(masked: fx.GraphModule) -> fx.GraphModule:
    """The network without its masks and without the ``targets`` input (a copy)."""
    out = copy.deepcopy(masked)
    for node in list(out.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(_PREFIX):
            node.replace_all_uses_with(node.args[0])
            out.graph.erase_node(node)
    for node in list(out.graph.nodes):
        if node.op == "placeholder" and node.target == "targets":
            out.graph.erase_node(node)
    for name, _ in list(out.named_children()):
        if name.startswith(_PREFIX):
            delattr(out, name)
    out.graph.lint()
    out.recompile()
    return out


def _masks(masked: nn.Module) -> dict[str, ClassMask]:
    return {n: m for n, m in masked.named_children() if isinstance(m, ClassMask)}


def mask_regularizer(masked: nn.Module) -> torch.Tensor:
    """White-Box's regulariser: ``sum_layers || sum_k M_l[k] ||_2`` over the class masks."""
    return sum(m.mask.sum(0).norm(2) for m in _masks(masked).values())


class WhiteBoxTrainer(ModelTrainer):
    """The mask phase: a masked network (:func:`add_class_masks`) trained with its masks by
    ``CE(model(x, y), y) + lam * mask_regularizer``. It has no validation: the masked network
    needs the labels, which test images do not have."""

    def __init__(self, masked: nn.Module, cfg: Config, run_dir: str | Path, epochs: float | None = None, *,
                 lam: float = 5e-4):  # fmt: skip
        if lam < 0:
            raise ValueError(f"the mask regulariser weight must be >= 0, got {lam}")
        super().__init__(masked, cfg, run_dir, epochs)
        self.lam = lam

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(self.model(x, y).float(), y, label_smoothing=self.cfg.train.label_smoothing)
        return ce + self.lam * mask_regularizer(self.model) if self.lam else ce

    def evaluate_validation(self) -> None:
        return None


def mask_scores(masked: nn.Module, groups: Sequence[str]) -> dict[str, torch.Tensor]:
    """``|sum over classes of the mask|`` per channel, for each masked group."""
    masks = _masks(masked)
    return {g: masks[_mask_name(g)].mask.detach().sum(0).abs().cpu() for g in groups}


def _vote(scores: Mapping[str, torch.Tensor], order: list[tuple[str, int]], n: int,
          minimum: Mapping[str, int]) -> dict[str, list[int]]:  # fmt: skip
    """Channels kept when the ``n`` globally best channels pass, with per-layer minimums."""
    kept: dict[str, list[int]] = {g: [] for g in scores}
    for g, i in order[:n]:
        kept[g].append(i)
    for g, idx in kept.items():
        if len(idx) < minimum[g]:
            idx[:] = torch.topk(scores[g], minimum[g]).indices.tolist()
        idx.sort()
    return kept


def _minimum(groups: Mapping[str, ChannelGroup], names: Sequence[str], min_keep: float) -> dict[str, int]:
    if not 0 <= min_keep <= 1:
        raise PruningError(f"min_keep must lie in [0, 1], got {min_keep}")
    return {g: max(1, int(groups[g].size * min_keep)) for g in names}


def vote_floor(
    model: fx.GraphModule,
    groups: Mapping[str, ChannelGroup],
    names: Sequence[str],
    input_size: Sequence[int],
    target_macs: int,
    min_keep: float = 0.3,
) -> int:
    """The fewest MACs the vote can reach (every layer in ``names`` at its minimum); raises
    :class:`PruningError` when ``target_macs`` is below it. Needs no scores: check before training."""
    floor = CostModel(model, groups, input_size)(_minimum(groups, names, min_keep))["macs"]
    if target_macs < floor:
        raise PruningError(
            f"a MACs target of {target_macs:,} is below the {floor:,} White-Box reaches with every layer at "
            f"its minimum ({min_keep:.0%} of its channels); raise the target or lower min_keep"
        )
    return floor


def global_vote(
    model: fx.GraphModule,
    groups: Mapping[str, ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    input_size: Sequence[int],
    target_macs: int,
    min_keep: float = 0.3,
) -> dict[str, list[int]]:
    """The channels to keep: the largest global vote whose compact network has ``<= target_macs``."""
    vote_floor(model, groups, list(scores), input_size, target_macs, min_keep)
    minimum = _minimum(groups, list(scores), min_keep)
    flat = [(g, i, float(s)) for g, t in scores.items() for i, s in enumerate(t)]
    order = [(g, i) for g, i, _ in sorted(flat, key=lambda e: -e[2])]  # stable: ties by position
    costs = CostModel(model, groups, input_size)

    def macs(n: int) -> int:
        return costs({g: len(k) for g, k in _vote(scores, order, n, minimum).items()})["macs"]

    lo, hi = 0, len(order)  # macs(0) is the floor, within the target; find the largest such n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if macs(mid) <= target_macs:
            lo = mid
        else:
            hi = mid - 1
    kept = _vote(scores, order, lo, minimum)
    costs.check({g: len(k) for g, k in kept.items()})
    return kept


def whitebox_prune(
    model: nn.Module,
    input_size: Sequence[int],
    num_classes: int,
    target_macs: int,
    cfg: Config,
    run_dir: str | Path,
    *,
    lam: float = 5e-4,
    min_keep: float = 0.3,
    include: str = "internal",
    resume: bool = False,
) -> PruneResult:
    """White-Box in one call: train masks with the network (``RUN/train``, the budget less the
    fine-tuning), vote to ``target_macs``, prune, fine-tune (``RUN/finetune``).

    ``model`` is not modified (the mask phase trains a copy). An unreachable target is an error
    before any training.
    """
    gm, groups = model_channel_groups(model, input_size)
    names = prunable_groups(groups, include)
    vote_floor(gm, groups, names, input_size, target_macs, min_keep)
    masked = add_class_masks(gm, input_size, num_classes, include)
    trainer = WhiteBoxTrainer(masked, cfg, Path(run_dir) / runs.PRUNE_TRAIN, pretrain_epochs(cfg), lam=lam)
    fit(trainer, resume)
    masked = trainer.model
    scores = mask_scores(masked, names)
    trained = strip_class_masks(masked)
    keep = global_vote(trained, groups, scores, input_size, target_macs, min_keep)
    compact = prune_channels(trained, groups, keep)
    val = finetune(compact, cfg, run_dir, resume)
    widths = {g: len(k) for g, k in keep.items()}
    info = {"lam": lam, "min_keep": min_keep, "target_macs": target_macs, "include": include,
            "scores": {g: s.tolist() for g, s in scores.items()}}  # fmt: skip
    return finish("whitebox", compact, input_size, widths, val, info)


@register_pruner("whitebox", budget="channels", trains_base=False, targets=("macs",))
def _whitebox(ctx: PruneContext) -> PruneResult:
    assert ctx.target_macs is not None  # the registration accepts MACs targets only
    p = ctx.cfg.prune
    return whitebox_prune(ctx.model, ctx.input_size, ctx.num_classes, ctx.target_macs, ctx.cfg, ctx.run_dir,
                          lam=p.lam, min_keep=p.min_keep, include=ctx.include, resume=ctx.resume)  # fmt: skip
