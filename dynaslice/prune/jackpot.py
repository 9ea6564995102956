"""Lottery Jackpots (Zhang et al., "Lottery Jackpots Exist in Pre-trained Models", TPAMI 2023;
code ``zyxxmu/lottery-jackpots``): a sparse mask searched over the *frozen* weights of a trained
network, then optionally a short weight tuning under that mask.

**Layers.** Every conv and linear layer but the classifier (the last weight layer of the graph)
gets a mask ``b`` and a trainable score ``s`` of its weight's shape; the layer computes with
``W * b`` (a :mod:`torch.nn.utils.parametrize` parametrization, so the layer stays the plain torch
layer it was). The gradient reaches the scores straight through the mask, ``dL/ds = dL/d(W*b) * W``
(as the official ``GetMask``). Weights, biases and BatchNorm's affine parameters are frozen (the
official ``freeze_model_weights``); BatchNorm's running statistics still move, because the search
runs in train mode -- which is why a fair baseline recalibrates them too (``bench/bench_jackpot.py``).
The classifier is frozen and stays dense: the official code gives ``fc`` a prune rate of 0.

**Layer-wise sparsity** (the official default ``layerwise: l1``): one magnitude threshold over all
masked weights, the ``int(N * (1 - sparsity))``-th largest ``|w|`` of the ``N``; each layer prunes
its weights below it, a count that never changes during the search. (The official code turns the
count into a rate and back, ``int(numel * rate)``, which float rounding can make one less; we keep
the count.) A layer may end up almost or fully pruned at high sparsity, as in the official code:
``info["layer_sparsity"]`` lists them.

**Scores** (``init``): ``magnitude`` is the official initialisation: 1.0 for the weights the
magnitude mask keeps, 0.99 for the ones it prunes (0.95 in the 2021 code), so the search starts at
the magnitude mask. ``uniform`` gives every score 1.0 and starts from a random mask of each
layer's size: no prior over the weights, the first steps' gradients order them. ``random`` is
edge-popup's initialisation (Kaiming-uniform scores, ``a = sqrt(5)``; the mask their top-k).
All three keep the same per-layer counts, so they differ only in where the search starts.

**The mask after every optimizer step** follows the code's ``final_pop_up`` (with ``rate`` 1, which
``adjust_rate`` always returns): with ``t`` the k-th smallest score of a layer that prunes ``k``
weights, the mask becomes "score > t" when exactly ``k`` scores are <= t, and stays as it was when
ties at ``t`` make the top-k ambiguous (the code's check that the two swap sets have equal sizes).
The paper's "short restriction" (limiting how many weights swap per step) reduces to this in the
code: the limit is ``ceil((1 - e/E)^4) = 1`` for every epoch, so every swap the scores ask for
happens. We follow the code, because it is what produced the published numbers.

**Training** is the engine (:class:`JackpotTrainer`, a :class:`~dynaslice.train.ModelTrainer`): the
config's optimizer and cosine schedule without warm-up (the scores start meaningful), the scores
its only parameters, weight decay on them as the official SGD does
(:meth:`JackpotMask.weight_decay_parameters`); masks and scores travel with the checkpoints (they
are the model's buffers and parameters), so a resumed search continues exactly.
Weight tuning (``tune_epochs > 0``, the official "30s10t" configs) trains the weights with the
found mask fixed (:class:`~dynaslice.prune.onexn.MaskedTrainer`) at ``prune.finetune_lr``.

**The result** is the plain dense model with weights ``W * b`` (exact zeros where pruned), its
non-zero parameters, and ``info["overlap"]``: the share of the final mask's kept weights that the
magnitude mask keeps too (1.0: the search changed nothing). It runs dense: torch and onnxruntime
have no unstructured sparse kernel that beats dense convolution at these sizes, so no speed-up is
claimed; :mod:`.sparse_file` stores it compactly (bitmask + values).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from .. import runs
from ..config_base import ConfigError
from ..seeding import derive_seed
from ..train.config import Config
from ..train.model import ModelTrainer
from .common import PruneResult, PruningError, _as_graph, finish
from .onexn import MaskedTrainer
from .phases import finetune_config, run_phase
from .registry import PruneContext, register_pruner
from .sparse_file import save_sparse

__all__ = [
    "JackpotMask",
    "JackpotTrainer",
    "SCORE_INITS",
    "attach_masks",
    "detach_masks",
    "global_magnitude_masks",
    "jackpot_prune",
    "masked_layers",
    "search_config",
]

SCORE_INITS = ("magnitude", "uniform", "random")
KEPT_SCORE, PRUNED_SCORE = 1.0, 0.99
"""The official magnitude initialisation of the scores (``set_prune_rate``)."""

SPARSE_FILE = "model.sparse.npz"
"""The result's compressed weights in a run directory (:mod:`.sparse_file`)."""


def masked_layers(model: nn.Module) -> tuple[list[str], str]:
    """The layers a search masks (every ``Conv2d`` and ``Linear`` in graph order) and the
    classifier (the last of them), which stays dense as the official ``fc``."""
    gm = model if isinstance(model, fx.GraphModule) else _as_graph(model)
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d | nn.Linear):
            names.append(node.target)
    names = list(dict.fromkeys(names))
    if len(names) < 2:
        raise PruningError("Lottery Jackpots needs a network with weight layers before its classifier")
    return names[:-1], names[-1]


@torch.no_grad()
def global_magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Boolean keep-masks from one magnitude threshold over all ``weights``: the
    ``int(N * (1 - sparsity))`` largest ``|w|`` of the ``N`` are kept (ties at the threshold too),
    so each layer's sparsity follows its share of small weights (the official ``layerwise: l1``)."""
    if not 0 < sparsity < 1:
        raise PruningError(f"sparsity must lie in (0, 1), got {sparsity}")
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = int(flat.numel() * (1 - sparsity))
    if keep < 1:
        raise PruningError(f"sparsity {sparsity} keeps none of the {flat.numel():,} weights; lower it")
    threshold = torch.topk(flat, keep).values[-1]
    return {name: w.detach().abs() >= threshold for name, w in weights.items()}


class JackpotMask(nn.Module):
    """The parametrization of one searched layer: ``weight * mask`` forward, the gradient straight
    through to ``scores``. ``mask`` (a buffer) keeps its number of zeros for good."""

    def __init__(self, keep: torch.Tensor, scores: torch.Tensor):
        super().__init__()
        self.scores = nn.Parameter(scores.detach().clone().to(torch.float32))
        self.register_buffer("mask", keep.detach().to(torch.float32).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # the value is the mask; (scores - scores.detach()) is exactly 0 but carries their gradient
        return weight * (self.mask + (self.scores - self.scores.detach())).to(weight.dtype)

    def weight_decay_parameters(self) -> list[nn.Parameter]:
        """The scores are decayed (:func:`~dynaslice.train.optim.param_groups`), as the official
        SGD decays every trainable parameter."""
        return [self.scores]

    @torch.no_grad()
    def update(self) -> int:
        """Re-take the mask as the top-k scores (the official ``final_pop_up``); returns how many
        weights entered it."""
        pruned = int(self.mask.numel() - self.mask.sum())
        if pruned == 0:
            return 0
        flat = self.scores.flatten()
        threshold = flat.kthvalue(pruned).values
        below = flat <= threshold
        if int(below.sum()) != pruned:  # ties at the threshold: the code swaps nothing
            return 0
        new = (~below).to(self.mask.dtype).view_as(self.mask)
        entered = int((new > self.mask).sum())
        self.mask.copy_(new)
        return entered


def _initial_scores(keep: torch.Tensor, init: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, scores)`` of one layer whose magnitude mask is ``keep`` under ``init``."""
    if init == "magnitude":
        return keep, torch.where(keep, KEPT_SCORE, PRUNED_SCORE)
    kept = int(keep.sum())
    if init == "uniform":
        order = torch.randperm(keep.numel(), generator=gen)
        scores = torch.ones(keep.shape)
    else:  # random: edge-popup's kaiming_uniform_(a=sqrt(5)) scores, the mask their top-k
        fan_in = keep[0].numel()
        bound = 1 / math.sqrt(fan_in)  # gain sqrt(2 / (1 + 5)) * sqrt(3 / fan_in)
        scores = torch.empty(keep.shape).uniform_(-bound, bound, generator=gen)
        order = torch.argsort(scores.flatten(), descending=True, stable=True)
    mask = torch.zeros(keep.numel(), dtype=torch.bool)
    mask[order[:kept]] = True
    return mask.view_as(keep), scores


def attach_masks(
    model: nn.Module, sparsity: float, init: str = "magnitude", seed: int = 0
) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """A copy of ``model`` (traced) ready to search: every masked layer parametrized by a
    :class:`JackpotMask`, every other parameter frozen. Returns it and the magnitude masks (bool)."""
    if init not in SCORE_INITS:
        raise PruningError(f"score init {init!r} is not one of {', '.join(SCORE_INITS)}")
    gm = _as_graph(copy.deepcopy(model))  # the caller's model is not modified
    layers, _ = masked_layers(gm)
    magnitude = global_magnitude_masks({n: gm.get_submodule(n).weight for n in layers}, sparsity)
    for p in gm.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(derive_seed("jackpot-scores", init, seed))
    for name in layers:
        module = gm.get_submodule(name)
        mask, scores = _initial_scores(magnitude[name].cpu(), init, gen)
        device = module.weight.device
        parametrize.register_parametrization(
            module, "weight", JackpotMask(mask.to(device), scores.to(device))
        )
    return gm, magnitude


def searched_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current boolean masks of a model from :func:`attach_masks`, by layer."""
    return {
        name: m.parametrizations["weight"][0].mask.bool().clone()
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight")
    }


def detach_masks(model: nn.Module) -> nn.Module:
    """Make a searched model plain (in place): each masked weight becomes ``W * mask`` (exact
    zeros), every parameter trainable again. Returns ``model``."""
    for m in list(model.modules()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def search_config(cfg: Config) -> Config:
    """The search's recipe: ``cfg``'s optimizer and cosine schedule without warm-up."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_epochs=0.0))


class JackpotTrainer(ModelTrainer):
    """The mask search on the engine: the scores are the only trainable parameters (weight decay
    applies to them), and every mask is re-taken from its scores after each optimizer step."""

    def __init__(self, model: nn.Module, cfg: Config, run_dir: str | Path, epochs: float | None = None):
        super().__init__(model, cfg, run_dir, epochs)
        self.masks = [m for m in self.model.modules() if isinstance(m, JackpotMask)]

    def after_step(self, losses: list[float], info: dict[str, Any]) -> None:
        entered = sum(m.update() for m in self.masks)
        info.setdefault("log", {})["entered"] = entered  # the metrics log: how much the mask still moves


def _overlap(found: Mapping[str, torch.Tensor], magnitude: Mapping[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in found.values())
    both = sum(int((found[n] & magnitude[n].to(found[n].device)).sum()) for n in found)
    return both / kept


def jackpot_prune(
    model: nn.Module,
    input_size: Sequence[int],
    sparsity: float = 0.9,
    *,
    init: str = "magnitude",
    search_epochs: float = 1.0,
    tune_epochs: float = 0.0,
    seed: int = 0,
    cfg: Config | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> PruneResult:
    """Lottery Jackpots on a trained plain ``model``: ``search_epochs`` of mask search over its frozen
    weights (``RUN/train``), then ``tune_epochs`` of weight tuning under the mask
    (``RUN/finetune``), with ``cfg``; one call. Without ``cfg``: the initial mask, unsearched.

    ``model`` is not modified. With ``run_dir`` the result is also written as a compressed
    sparse file, ``RUN/model.sparse.npz`` (its size in ``info["sparse_file"]``).
    """
    if not 0 < sparsity < 1:
        raise PruningError(f"sparsity must lie in (0, 1), got {sparsity}")
    if init not in SCORE_INITS:
        raise PruningError(f"score init {init!r} is not one of {', '.join(SCORE_INITS)}")
    if not (search_epochs >= 0 and tune_epochs >= 0 and math.isfinite(search_epochs + tune_epochs)):
        raise PruningError(f"search and tune epochs must be >= 0, got {search_epochs} and {tune_epochs}")
    work, magnitude = attach_masks(model, sparsity, init, seed)
    val: dict[str, Any] = {}
    if cfg is not None and search_epochs > 0:
        val = run_phase(
            work, search_config(cfg), run_dir, runs.PRUNE_TRAIN, search_epochs, resume, JackpotTrainer
        )
    found = searched_masks(work)
    overlap = _overlap(found, magnitude)
    detach_masks(work)
    if cfg is not None and tune_epochs > 0:
        val = run_phase(work, finetune_config(cfg), run_dir, runs.PRUNE_FINETUNE, tune_epochs, resume,
                        MaskedTrainer, masks=found)  # fmt: skip
    layers = {n: round(1 - float(m.float().mean()), 6) for n, m in found.items()}
    info = {
        "sparsity": sparsity, "init": init, "search_epochs": search_epochs, "tune_epochs": tune_epochs,
        "overlap": overlap, "masked_weights": sum(m.numel() for m in found.values()),
        "kept_weights": sum(int(m.sum()) for m in found.values()), "layer_sparsity": layers,
        "classifier": masked_layers(work)[1],
    }  # fmt: skip
    result = finish("jackpot", work, input_size, {}, val, info)
    if run_dir is not None:
        result.info["sparse_file"] = save_sparse(result.model.state_dict(), Path(run_dir) / SPARSE_FILE)
    return result


# --------------------------------------------------------------------------- dynaslice prune jackpot


def _jackpot_settings(cfg: Config) -> None:
    """``prune.*`` for jackpot, checked when a config choosing it loads (before any training)."""
    p = cfg.prune
    if not 0 < p.sparsity < 1:
        raise ConfigError(f"jackpot needs prune.sparsity in (0, 1), got {p.sparsity}")
    if p.score_init not in SCORE_INITS:
        raise ConfigError(f"prune.score_init={p.score_init!r} is not one of {', '.join(SCORE_INITS)}")
    if not 0 <= p.tune_epochs < p.finetune_epochs:
        raise ConfigError(
            f"prune.tune_epochs must lie in [0, prune.finetune_epochs) ({p.finetune_epochs}: the search "
            f"gets the rest), got {p.tune_epochs}"
        )


@register_pruner("jackpot", budget="sparsity", trains_base=True, check=_jackpot_settings)
def _jackpot(ctx: PruneContext) -> PruneResult:
    """The base trains ``train.epochs - prune.finetune_epochs``; the search and the tuning share
    ``prune.finetune_epochs``, so jackpot and magnitude pruning get equal epochs from one config."""
    p = ctx.cfg.prune
    search = p.finetune_epochs - p.tune_epochs
    return jackpot_prune(
        ctx.model, ctx.input_size, p.sparsity, init=p.score_init, search_epochs=search, tune_epochs=p.tune_epochs,
        seed=ctx.cfg.train.seed, cfg=ctx.cfg, run_dir=ctx.run_dir, resume=ctx.resume,
    )  # fmt: skip
