"""What every pruning method shares: channel groups, surgery, budgets, exact costs, results.

**Channel groups.** Pruning a conv's output channel means removing its filter, the matching
entries of the BatchNorm after it and the matching input slice of every layer that reads it.
:func:`channel_groups` finds those sets with the one channel-group engine (:mod:`dynaslice.graph`),
so no model-specific table is needed: a conv output starts a group; norms, activations and
pooling pass it through; a residual ``+`` merges the groups it adds (the *tied* residual stream
of a ResNet stage: its convs must keep the same channels), a squeeze-and-excitation ``*`` ties the
gate to what it scales; convs and linear layers that read it are its consumers. A group that
reaches the model's input or output is fixed. An op the engine cannot follow, or one the surgery
cannot cut, raises an error naming it, never a silent guess. Groups are named after their first
producer (``layer1.0.conv1``).

**Surgery.** :func:`prune_channels` returns a copy in which each producer, norm and consumer of a
pruned group is replaced by a smaller ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` holding
the selected rows/columns; the ``fx`` graph itself is unchanged and keeps working. An index list
that keeps every channel in another order *permutes* them (1xN's filter rearrangement), which
leaves the function unchanged.

**Costs.** :func:`dynaslice.counting.count_module_macs` and
:func:`~dynaslice.counting.count_module_params` count any plain model with
``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2 of convolutions and matmuls, on a
meta-device copy), the counter :func:`dynaslice.count_macs` is checked against, so a pruned
network and a supernet subnet are measured alike. :class:`CostModel` derives the costs of any
widths from one count, for budget searches. *Nominal* MACs (``sparse=True``) scale each layer by
its fraction of non-zero weights -- what a sparse kernel would do, not what torch or onnxruntime
run (they run the dense weights).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..counting import count_module_macs, count_module_params, meta_copy, module_macs
from ..graph import ChannelGroup as EngineGroup
from ..graph import Tracer, analyze

__all__ = [
    "ChannelGroup",
    "CostModel",
    "PruneResult",
    "PruningError",
    "model_accuracy",
    "model_channel_groups",
    "check_compact",
    "export_pruned_onnx",
    "finish",
    "prunable_groups",
    "prune_channels",
    "reinitialize",
    "resolve_widths",
    "uniform_widths",
]


class PruningError(ValueError):
    """A pruning request that cannot be met (budget out of reach, unknown layer, bad indices)."""


# --------------------------------------------------------------------------- channel groups


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together, and every layer that touches them.

    ``producers`` write the channels (several when residual adds tie them), ``norms`` normalise
    them, ``channelwise`` are depthwise convs applied to them, ``consumers`` read them as input.
    ``residual`` says whether the channels pass through an add; ``fixed`` groups (model input or
    output) can't be pruned.
    """

    name: str
    size: int
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    channelwise: tuple[str, ...]
    consumers: tuple[str, ...]
    residual: bool
    fixed: bool

    @property
    def internal(self) -> bool:
        """One producer and no residual add: free to prune on its own (a block's inner width)."""
        return not self.fixed and not self.residual and len(self.producers) == 1


_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d)


def _as_graph(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.GraphModule(model, Tracer().trace(model))
    except Exception as e:  # fx raises many types; the user needs one message
        raise PruningError(
            f"{type(model).__name__} cannot be traced by torch.fx ({e}); prune a traceable model, e.g. "
            "the output of dynaslice.extract_subnet"
        ) from e


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the block, then restore each one's own mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def model_channel_groups(
    model: nn.Module, input_size: Sequence[int]
) -> tuple[fx.GraphModule, dict[str, ChannelGroup]]:
    """``model`` as an ``fx.GraphModule`` and its channel groups, keyed by name, in graph order.

    ``input_size`` is ``(C, H, W)``; one forward pass in eval mode (no statistics change, no
    gradients) records the tensor shapes the analysis checks. The groups come from the one
    channel-group engine (:mod:`dynaslice.graph`); what it cannot follow, or what the surgery
    below cannot cut (concatenations, grouped convs, a flatten of a spatial map), is an error
    naming it rather than a group left out.
    """
    gm = _as_graph(model)
    param = next(gm.parameters(), None)
    example = torch.zeros(1, *input_size, dtype=param.dtype if param is not None else None,
                          device=param.device if param is not None else None)  # fmt: skip
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(example)
    analysis = analyze(gm)
    if analysis.stops:
        raise PruningError(f"pruning does not know how channels flow through {analysis.stops[0]}")
    out: dict[str, ChannelGroup] = {}
    for group in analysis.groups.values():
        if not group.modules("producer"):
            continue  # the model's input: nothing to prune
        _check_cuttable(gm, group)
        out[group.name] = ChannelGroup(
            group.name, group.size, group.modules("producer"), group.modules("norm"),
            group.modules("channelwise"), group.modules("consumer"), group.residual, group.fixed is not None,
        )  # fmt: skip
    return gm, out


def _check_cuttable(gm: fx.GraphModule, group: EngineGroup) -> None:
    """Refuse what :func:`prune_channels` cannot cut: it selects whole rows and columns of
    Conv2d / Linear layers, depthwise convs and BatchNorm, one channel per position."""
    for m in group.members:
        module = gm.get_submodule(m.module)
        what = f"{m.module} ({type(module).__name__})"
        if m.offset or m.repeat != 1:
            raise PruningError(
                f"pruning does not support {what}: it reads the channels of {group.name} concatenated with "
                "others, repeated (a flatten of a spatial map) or multiplied (a channel multiplier)"
            )
        if m.role in ("producer", "consumer") and not (
            (isinstance(module, nn.Conv2d) and module.groups == 1) or isinstance(module, nn.Linear)
        ):
            raise PruningError(f"pruning does not know how channels flow through {what}")
        if m.role == "channelwise" and not module.groups == module.in_channels == module.out_channels:
            raise PruningError(f"pruning does not support the grouped conv {what}")
        if m.role == "norm" and not isinstance(module, _NORMS):
            raise PruningError(f"pruning does not know how channels flow through {what}")


def prunable_groups(groups: Mapping[str, ChannelGroup], include: str = "internal") -> list[str]:
    """Names of the groups a method may prune: ``internal`` (block-inner widths) or ``all`` (plus
    the tied residual streams)."""
    if include == "internal":
        return [n for n, g in groups.items() if g.internal]
    if include == "all":
        return [n for n, g in groups.items() if not g.fixed]
    raise PruningError(f"include must be 'internal' or 'all', got {include!r}")


# --------------------------------------------------------------------------- surgery


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _param(t: torch.Tensor | None, requires_grad: bool = True) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().clone(), requires_grad=requires_grad)


def _new_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> nn.Conv2d:
    w = conv.weight.detach()
    depthwise = conv.groups > 1
    if depthwise:  # a channel-wise layer: its filters follow the selection of its input channels
        out_idx = in_idx
    if out_idx is not None:
        w = w.index_select(0, out_idx)
    if in_idx is not None and not depthwise:
        w = w.index_select(1, in_idx)
    out_ch, in_ch = w.shape[0], w.shape[1] * (w.shape[0] if depthwise else 1)
    new = nn.Conv2d(
        in_ch, out_ch, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        groups=out_ch if depthwise else 1, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device="meta",
    )  # fmt: skip
    new.weight = _param(w, conv.weight.requires_grad)
    if conv.bias is not None:
        b = conv.bias.detach()
        new.bias = _param(b if out_idx is None else b.index_select(0, out_idx), conv.bias.requires_grad)
    return new.train(conv.training)


def _new_linear(lin: nn.Linear, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> nn.Linear:
    w = lin.weight.detach()
    if out_idx is not None:
        w = w.index_select(0, out_idx)
    if in_idx is not None:
        w = w.index_select(1, in_idx)
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device="meta")
    new.weight = _param(w, lin.weight.requires_grad)
    if lin.bias is not None:
        b = lin.bias.detach()
        new.bias = _param(b if out_idx is None else b.index_select(0, out_idx), lin.bias.requires_grad)
    return new.train(lin.training)


def _new_norm(bn: nn.BatchNorm2d | nn.BatchNorm1d, idx: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(bn)  # keeps eps, momentum, affine, track_running_stats, mode
    new.num_features = len(idx)
    for name in ("weight", "bias"):
        p = getattr(bn, name)
        if p is not None:
            setattr(new, name, _param(p.index_select(0, idx), p.requires_grad))
    for name in ("running_mean", "running_var"):
        b = getattr(bn, name)
        if b is not None:
            setattr(new, name, b.index_select(0, idx).clone())
    return new


def _indices(group: ChannelGroup, idx: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(idx, dtype=torch.long).flatten()
    if len(t) == 0 or len(set(t.tolist())) != len(t) or int(t.min()) < 0 or int(t.max()) >= group.size:
        raise PruningError(
            f"channels to keep in {group.name!r} must be distinct indices in 0..{group.size - 1}, at least one; "
            f"got {t.tolist()}"
        )
    return t.to(device)


def prune_channels(
    model: fx.GraphModule,
    groups: Mapping[str, ChannelGroup],
    keep: Mapping[str, Sequence[int] | torch.Tensor],
    producers: bool = True,
) -> fx.GraphModule:
    """A copy of ``model`` keeping, in each group named in ``keep``, the channels listed there.

    ``groups`` comes from :func:`channel_groups` on ``model``. The channels come out in the order
    given (a full permutation reorders them, with the same function). ``producers=False`` leaves
    the producers' outputs whole and only narrows what reads them (DCFF, which fuses the
    producers' filters instead of selecting them).
    """
    out_sel: dict[str, torch.Tensor] = {}
    in_sel: dict[str, torch.Tensor] = {}
    norm_sel: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    for name, idx in keep.items():
        if name not in groups:
            raise PruningError(f"unknown channel group {name!r}; groups are {', '.join(groups)}")
        group = groups[name]
        if group.fixed:
            raise PruningError(
                f"channel group {name!r} reaches the model's input or output and can't be pruned"
            )
        t = _indices(group, idx, device)
        for p in group.producers if producers else ():
            out_sel[p] = t
        for m in group.consumers + group.channelwise:
            in_sel[m] = t
        for m in group.norms:
            norm_sel[m] = t
    new = copy.deepcopy(model)
    for name in sorted(set(out_sel) | set(in_sel) | set(norm_sel)):
        old = model.get_submodule(name)
        if name in norm_sel:
            _set_module(new, name, _new_norm(old, norm_sel[name]))
        elif isinstance(old, nn.Conv2d):
            _set_module(new, name, _new_conv(old, out_sel.get(name), in_sel.get(name)))
        elif isinstance(old, nn.Linear):
            _set_module(new, name, _new_linear(old, out_sel.get(name), in_sel.get(name)))
        else:
            raise PruningError(
                f"{name!r} is a {type(old).__name__}; only Conv2d and Linear layers can produce channels"
            )
    return new


def keep_first(widths: Mapping[str, int]) -> dict[str, list[int]]:
    """The first ``w`` channels of each group: the selection for costs that only depend on widths."""
    return {name: list(range(w)) for name, w in widths.items()}


def reinitialize(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Fresh weights, as dynaslice's ResNets (and torchvision's) initialise them; returns ``model``.

    Convs: Kaiming normal (fan-out, ReLU gain); norms: weight 1, bias 0, fresh statistics;
    linear layers: torch's default. ``seed`` makes it reproducible without touching global RNGs.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                w = torch.empty(m.weight.shape)
                fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
                w.normal_(0.0, math.sqrt(2.0 / fan_out), generator=gen)
                m.weight.copy_(w)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, _NORMS):
                m.reset_parameters()
            elif isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.in_features)
                m.weight.copy_(torch.empty(m.weight.shape).uniform_(-bound, bound, generator=gen))
                if m.bias is not None:
                    m.bias.copy_(torch.empty(m.bias.shape).uniform_(-bound, bound, generator=gen))
    return model


# --------------------------------------------------------------------------- costs


def uniform_widths(groups: Mapping[str, ChannelGroup], names: Iterable[str], ratio: float) -> dict[str, int]:
    """``floor(ratio * size)`` channels (at least one) in each named group."""
    return {n: max(1, min(groups[n].size, math.floor(ratio * groups[n].size + 1e-9))) for n in names}


class CostModel:
    """Exact MACs and parameters of the compact network for any widths, without building it.

    A conv or linear layer costs ``out * in * (the rest)`` MACs and weights, and a norm or bias
    ``out``, so each item measured once on the full network (with ``FlopCounterMode``) scales by
    ``width / size`` of the group(s) it belongs to. Searching a budget then takes microseconds per
    candidate instead of a surgery and a count. :meth:`check` compares a result with the counter.
    """

    def __init__(self, model: fx.GraphModule, groups: Mapping[str, ChannelGroup], input_size: Sequence[int]):
        self.model, self.groups, self.input_size = model, groups, tuple(input_size)
        out_of, in_of = {}, {}
        for g in groups.values():
            for m in g.producers + g.norms + g.channelwise:
                out_of[m] = g.name
            for m in g.consumers:
                in_of[m] = g.name
        total, per_leaf = module_macs(model, input_size)
        self.items: list[tuple[str, int, tuple[str, ...]]] = [("macs", total - sum(per_leaf.values()), ())]
        for name, module in model.named_modules():
            out_g, in_g = out_of.get(name), in_of.get(name)
            both = tuple(g for g in (out_g, in_g) if g is not None)
            if per_leaf.get(name):
                self.items.append(("macs", per_leaf[name], both))
            for p in module.parameters(recurse=False):
                self.items.append(
                    ("params", p.numel(), both if p.ndim > 1 else tuple(g for g in (out_g,) if g))
                )

    def __call__(self, widths: Mapping[str, int]) -> dict[str, int]:
        costs = {"macs": 0, "params": 0}
        for kind, count, factors in self.items:
            num, den = count, 1
            for g in factors:
                num *= widths.get(g, self.groups[g].size)
                den *= self.groups[g].size
            costs[kind] += num // den
        return costs

    def check(self, widths: Mapping[str, int]) -> dict[str, int]:
        """The costs of ``widths``, after checking them against torch's counter on the real compact net."""
        want = self(widths)
        compact = prune_channels(meta_copy(self.model), self.groups, keep_first(widths))
        got = {"macs": count_module_macs(compact, self.input_size), "params": count_module_params(compact)}
        if got != want:
            raise RuntimeError(
                f"cost model {want} disagrees with FlopCounterMode {got}; please report this model"
            )
        return got


def resolve_widths(
    model: fx.GraphModule,
    groups: Mapping[str, ChannelGroup],
    input_size: Sequence[int],
    include: str = "internal",
    widths: Mapping[str, int] | None = None,
    target_macs: int | None = None,
    target_params: int | None = None,
) -> dict[str, int]:
    """Channels to keep per group: ``widths`` checked, or the uniform ratio meeting a budget.

    With ``target_macs`` (or ``target_params``) every group in ``include`` keeps the same fraction
    of its channels, the largest fraction whose compact network stays within the budget. A
    budget below the network with one channel per prunable group raises :class:`PruningError`.
    """
    if sum(x is not None for x in (widths, target_macs, target_params)) != 1:
        raise PruningError("give exactly one of widths, target_macs or target_params")
    if widths is not None:
        for name, w in widths.items():
            if name not in groups or groups[name].fixed:
                choices = ", ".join(prunable_groups(groups, "all"))
                raise PruningError(f"{name!r} is not a prunable channel group; choose from {choices}")
            if not 1 <= int(w) <= groups[name].size:
                raise PruningError(f"width {w} for {name!r} must lie in 1..{groups[name].size}")
        return {n: int(w) for n, w in widths.items()}
    kind, target = ("macs", target_macs) if target_macs is not None else ("params", target_params)
    names = prunable_groups(groups, include)
    if not names:
        raise PruningError(f"the model has no channel groups to prune with include={include!r}")
    costs = CostModel(model, groups, input_size)
    floor = costs(uniform_widths(groups, names, 0.0))[kind]
    if target < floor:
        raise PruningError(
            f"a {kind} target of {target:,} is below the {floor:,} left with one channel in every prunable "
            f"group (include={include!r}); raise the target or include more groups"
        )
    # widths only change where ratio * size crosses an integer: search those ratios
    ratios = sorted({k / groups[n].size for n in names for k in range(1, groups[n].size + 1)})
    lo, hi = 0, len(ratios) - 1  # ratios[0] gives the floor, which fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if costs(uniform_widths(groups, names, ratios[mid]))[kind] <= target:
            lo = mid
        else:
            hi = mid - 1
    chosen = uniform_widths(groups, names, ratios[lo])
    costs.check(chosen)
    return chosen


# --------------------------------------------------------------------------- results


def check_compact(model: nn.Module) -> nn.Module:
    """Raise :class:`TypeError` unless ``model`` is made of plain modules only.

    No dynaslice layers, no pruning masks or parametrizations, no hooks: what torch and ONNX
    see is the whole model. The layers of the user's own model library stay (a converted timm
    network keeps its ``BatchNormAct2d``, a BatchNorm that pruning cuts like any other).
    """
    for name, m in model.named_modules():
        where = name or "the model"
        if type(m).__module__.split(".")[0] == "dynaslice":
            raise TypeError(f"{where} is a {type(m).__module__}.{type(m).__name__}, not a plain torch module")
        if m._forward_pre_hooks or m._forward_hooks or getattr(m, "parametrizations", None):
            raise TypeError(
                f"{where} still has hooks or parametrizations (pruning masks?); remove them first"
            )
    return model


@dataclass
class PruneResult:
    """One method's pruned network and what it costs.

    ``macs`` is what torch/onnxruntime run (dense); ``nominal_macs`` is the sparse count (equal
    to ``macs`` for channel pruning; lower for 1xN and unstructured sparsity, whose speed must be
    measured, never inferred from it). ``widths`` holds the kept channels per group;
    ``val_accuracy`` the final validation top-1 (%) of the run that trained it, if any.
    """

    method: str
    model: nn.Module
    input_size: tuple[int, ...]
    macs: int
    nominal_macs: int
    params: int
    nonzero_params: int
    widths: dict[str, int] = field(default_factory=dict)
    val_accuracy: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the model, JSON-serialisable."""
        return {
            "method": self.method, "input_size": list(self.input_size), "macs": self.macs,
            "nominal_macs": self.nominal_macs, "params": self.params, "nonzero_params": self.nonzero_params,
            "widths": self.widths, "val_accuracy": self.val_accuracy, "info": self.info,
        }  # fmt: skip


def finish(
    method: str,
    model: nn.Module,
    input_size: Sequence[int],
    widths: Mapping[str, int] | None = None,
    val: Mapping[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> PruneResult:
    """Check that ``model`` is plain torch, count its costs and wrap it in a :class:`PruneResult`.

    ``val``: the last training run's final validation (``ModelTrainer.fit``'s result). The
    model is put in eval mode: a result is ready to evaluate, export or serve.
    """
    check_compact(model)
    model.eval()
    input_size = tuple(input_size)
    return PruneResult(
        method, model, input_size,
        macs=count_module_macs(model, input_size), nominal_macs=count_module_macs(model, input_size, sparse=True),
        params=count_module_params(model), nonzero_params=count_module_params(model, nonzero=True),
        widths=dict(widths or {}), val_accuracy=(val or {}).get("accuracy"), info=dict(info or {}),
    )  # fmt: skip


@torch.no_grad()
def model_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy (%) of a plain model over ``batches``, in eval mode (its mode is restored)."""
    device = next(model.parameters()).device
    correct = total = 0
    with eval_mode(model):
        for x, y in batches:
            correct += int((model(x.to(device)).argmax(-1).cpu() == y).sum())
            total += len(y)
    if total == 0:
        raise ValueError("accuracy got no images")
    return 100.0 * correct / total


def export_pruned_onnx(result: PruneResult, path: str | os.PathLike, batch_dynamic: bool = True) -> Path:
    """Write a pruned network to ONNX (dense weights), runnable by :class:`dynaslice.onnx_package.OnnxModel`.

    The summary (method, dense and nominal MACs, widths) is stored in the ``dynaslice.prune``
    metadata entry. The model itself is left as it is (the export works on a copy).
    """
    from ..onnx_export import export_module

    summary = {k: v for k, v in result.summary().items() if k != "info"}
    return export_module(
        copy.deepcopy(result.model), path, result.input_size, batch_dynamic=batch_dynamic,
        metadata={"dynaslice.prune": json.dumps(summary)},
    )  # fmt: skip
