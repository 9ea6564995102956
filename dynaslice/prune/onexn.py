"""1xN block sparsity (Lin et al., "1xN Pattern for Pruning Convolutional Neural Networks", TPAMI
2022; code ``lmbxmu/1xN``) and the unstructured magnitude baseline at equal parameters.

**1xN.** A block is ``N`` consecutive output kernels at one input channel: ``W[o:o+N, i, :, :]``.
Each sparse conv drops its ``int(sparsity * blocks)`` blocks of smallest L1 norm (the same rate
in every layer, as the official ``pr_target``); the mask is fixed and the network fine-tuned with
it on the engine (:class:`MaskedTrainer`: pruned weights are zeroed before training and again
after every optimizer step, so every forward sees them at zero), and the result is a plain model
whose pruned weights are exact zeros.

**Filter rearrangement** (``rearrange=True``). Before the blocks are formed, a conv's output
filters are sorted by L1 norm (ascending, as the official ``rearrange_w``), so that each block
holds filters of similar magnitude; the BatchNorm after it and the next layer's input channels
are permuted the same way, which leaves the network's function unchanged (tested). Only channel
groups that one conv owns can be permuted freely; the residual stream's producers must share one
order, so, like the official ResNet-50 code for its ``conv3`` layers, they are not rearranged.

**Layers.** Every ordinary conv except the ones that read the network input (the stem, whose few
input channels make blocks meaningless; the official code keeps it dense too); linear layers stay
dense (the official classifier is at rate 0).

**Costs, honestly.** Torch and onnxruntime have no 1xN kernel on CPU: the model runs its dense
weights, so its measured latency is the dense network's. ``PruneResult.nominal_macs`` counts
only the non-zero weights (what a 1xN kernel would compute); ``macs`` is what actually runs.
Report them side by side, never one for the other.

Departures from the official code, and why:

- The official ``get_rearr_mask`` computes the mask on sorted filters and maps it back to the
  original order, leaving the layout unchanged (so the blocks are not consecutive in memory, and
  a 1xN kernel could not run them). We permute the weights themselves, so blocks are consecutive.
- The official ResNet-50 also rearranges the downsample projection, which shares the residual
  stream with ``conv3``; no single permutation can serve both, so we leave it unpermuted.
- The unstructured baseline prunes ``int(sparsity * numel)`` weights per layer by magnitude (the
  official ``UnstructureConv``), on the same layers, so both patterns keep the same parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..train.config import Config
from ..train.model import ModelTrainer
from .common import ChannelGroup, PruneResult, PruningError, finish, model_channel_groups, prune_channels
from .phases import finetune
from .registry import PruneContext, register_pruner

__all__ = [
    "MaskedTrainer",
    "apply_masks",
    "block_mask",
    "magnitude_mask",
    "magnitude_prune",
    "onexn_prune",
    "rearrange_filters",
    "sparse_layers",
]


def sparse_layers(model: fx.GraphModule) -> list[str]:
    """The convs 1xN prunes: ordinary (``groups=1``) convs that do not read the network input."""
    inputs = {n for n in model.graph.nodes if n.op == "placeholder"}
    names = []
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        m = model.get_submodule(node.target)
        if isinstance(m, nn.Conv2d) and m.groups == 1 and not set(node.all_input_nodes) & inputs:
            names.append(node.target)
    return list(dict.fromkeys(names))


def block_mask(weight: torch.Tensor, n: int, sparsity: float) -> torch.Tensor:
    """A 0/1 mask of ``weight`` ``[O, I, kh, kw]`` dropping its ``int(sparsity * O/n * I)`` 1xN
    blocks (``n`` consecutive output kernels at one input channel) of smallest L1 norm."""
    out_ch, in_ch = weight.shape[:2]
    if n < 1 or out_ch % n:
        raise PruningError(
            f"a layer with {out_ch} output channels can't be split into 1x{n} blocks; choose N dividing it"
        )
    if not 0 <= sparsity < 1:
        raise PruningError(f"sparsity must lie in [0, 1), got {sparsity}")
    w = weight.detach().abs().reshape(out_ch // n, n, in_ch, -1)
    scores = w.sum(dim=(1, 3))  # [O/n, I]
    drop = int(scores.numel() * sparsity)
    keep = torch.ones(scores.numel(), device=weight.device)
    keep[torch.topk(scores.flatten(), drop, largest=False).indices] = 0
    keep = keep.view(out_ch // n, 1, in_ch, 1).expand(-1, n, -1, w.shape[-1])
    return keep.reshape(weight.shape).to(weight.dtype)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0/1 mask dropping the ``int(sparsity * numel)`` weights of smallest magnitude."""
    if not 0 <= sparsity < 1:
        raise PruningError(f"sparsity must lie in [0, 1), got {sparsity}")
    keep = torch.ones(weight.numel(), device=weight.device, dtype=weight.dtype)
    keep[
        torch.topk(weight.detach().abs().flatten(), int(weight.numel() * sparsity), largest=False).indices
    ] = 0
    return keep.view_as(weight)


def rearrange_filters(
    model: fx.GraphModule, groups: Mapping[str, ChannelGroup], layers: Sequence[str]
) -> tuple[fx.GraphModule, dict[str, list[int]]]:
    """A copy with the output filters of each conv in ``layers`` that owns its channel group
    sorted by ascending L1 norm (norms and consumers permuted alike: same function).

    Returns the model and the permutation applied per group.
    """
    wanted = set(layers)
    perms = {}
    for name, g in groups.items():
        if g.internal and g.producers[0] in wanted and isinstance(model.get_submodule(name), nn.Conv2d):
            norms = model.get_submodule(name).weight.detach().abs().flatten(1).sum(1).cpu()
            perms[name] = torch.sort(norms, stable=True).indices.tolist()
    return prune_channels(model, groups, perms), perms


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the weights each 0/1 mask drops (in place); returns ``model``."""
    for name, mask in masks.items():
        model.get_submodule(name).weight.mul_(mask.to(model.get_submodule(name).weight))
    return model


class MaskedTrainer(ModelTrainer):
    """Fine-tunes with fixed sparsity masks (``{layer: 0/1 tensor}``): the pruned weights are zero
    before the first step and after every optimizer step. The masks travel with checkpoints, so
    a resumed run keeps exactly the pattern it started with."""

    def __init__(self, model: nn.Module, cfg: Config, run_dir: str | Path, epochs: float | None = None, *,
                 masks: Mapping[str, torch.Tensor]):  # fmt: skip
        super().__init__(model, cfg, run_dir, epochs)
        self.masks = {name: m.detach().to(self.device, torch.bool) for name, m in masks.items()}
        apply_masks(self.model, self.masks)

    def after_step(self, losses: list[float], info: dict[str, Any]) -> None:
        apply_masks(self.model, self.masks)

    def extra_state(self) -> dict[str, Any]:
        return {"masks": {name: m.cpu() for name, m in self.masks.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.masks = {name: m.to(self.device) for name, m in state["masks"].items()}


def _sparse_run(
    method: str,
    model: nn.Module,
    input_size: Sequence[int],
    make_mask,
    rearrange: bool,
    layers: Sequence[str] | None,
    cfg: Config | None,
    run_dir: str | Path | None,
    resume: bool,
    info: dict,
) -> PruneResult:
    gm, groups = model_channel_groups(model, input_size)
    layers = list(layers) if layers is not None else sparse_layers(gm)
    unknown = [n for n in layers if not isinstance(dict(gm.named_modules()).get(n), nn.Conv2d)]
    if unknown:
        raise PruningError(
            f"{', '.join(unknown)}: not conv layers of the model; 1xN and magnitude pruning take convs"
        )
    perms: dict[str, list[int]] = {}
    if rearrange:
        work, perms = rearrange_filters(gm, groups, layers)
    else:
        work = copy.deepcopy(gm)
    masks = {n: make_mask(work.get_submodule(n).weight) for n in layers}
    apply_masks(work, masks)
    val = finetune(work, cfg, run_dir, resume, MaskedTrainer, masks=masks)
    info = {**info, "layers": layers, "rearranged": sorted(perms)}
    return finish(method, work, input_size, {}, val, info)


def onexn_prune(
    model: nn.Module,
    input_size: Sequence[int],
    n: int = 4,
    sparsity: float = 0.5,
    rearrange: bool = True,
    *,
    layers: Sequence[str] | None = None,
    cfg: Config | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> PruneResult:
    """1xN block pruning of a trained plain model with a fixed mask, then fine-tuning (with ``cfg``,
    in ``RUN/finetune``); one call.

    ``model`` is not modified. The result runs dense: see the module docstring on costs.
    """
    mask = lambda w: block_mask(w, n, sparsity)  # noqa: E731
    info = {"n": n, "sparsity": sparsity, "rearrange": rearrange}
    return _sparse_run(f"1x{n}", model, input_size, mask, rearrange, layers, cfg, run_dir, resume, info)


def magnitude_prune(
    model: nn.Module,
    input_size: Sequence[int],
    sparsity: float = 0.5,
    *,
    layers: Sequence[str] | None = None,
    cfg: Config | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> PruneResult:
    """Unstructured magnitude pruning on the same layers as 1xN (equal parameters at equal
    ``sparsity``), fixed mask, then fine-tuning."""
    mask = lambda w: magnitude_mask(w, sparsity)  # noqa: E731
    info = {"sparsity": sparsity}
    return _sparse_run("magnitude", model, input_size, mask, False, layers, cfg, run_dir, resume, info)


@register_pruner("onexn", budget="sparsity", trains_base=True)
def _onexn(ctx: PruneContext) -> PruneResult:
    p = ctx.cfg.prune
    return onexn_prune(ctx.model, ctx.input_size, p.n, p.sparsity, p.rearrange, cfg=ctx.cfg, run_dir=ctx.run_dir,
                       resume=ctx.resume)  # fmt: skip


@register_pruner("magnitude", budget="sparsity", trains_base=True)
def _magnitude(ctx: PruneContext) -> PruneResult:
    return magnitude_prune(ctx.model, ctx.input_size, ctx.cfg.prune.sparsity, cfg=ctx.cfg, run_dir=ctx.run_dir,
                           resume=ctx.resume)  # fmt: skip
