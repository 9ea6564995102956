"""Channel-importance ordering: put the most important channels first before slicing.

A subnet keeps the *first* ``k`` channels of every sliced dimension. In a network trained alone
(or a supernet started from one) nothing makes the first channels the important ones, so its
narrow slices are poor. Once-for-all's progressive shrinking sorts each sliced dimension by
importance before elastic-width training (``re_organize_middle_weights``): the importance of a
channel is the L1 norm of what its *consumers* read from it (``sum |W_next[:, c]|``), and the
producer's rows, the BatchNorm parameters and statistics and every consumer's input columns are
permuted together, which leaves the largest subnet's function unchanged.

One mechanism serves every conv family. :func:`channel_groups` traces the largest subnet with
``torch.fx`` (sliced layers as leaves, as :func:`dynaslice.extract_subnet` does) and hands it to the
one channel-group engine (:mod:`dynaslice.graph`, shared with pruning and
:func:`dynaslice.make_supernet`): a conv or linear layer starts a new group of channels,
BatchNorm, depthwise convs, activations and pooling keep it, and ``add``/``mul`` join the groups
of their operands, so a residual stream or a squeeze-and-excitation scale becomes one tied
group. A group is sliced when its width changes with the Arch; which dimension slices it is
found by re-tracing with that dimension at its minimum. For a tied group the importance is the
sum over its consumers of each one's L1 importance normalised to sum 1 (as NNCF BootstrapNAS and
ModelOpt do), so a layer with larger weights does not outvote the others.

Supported: ResNet (basic and bottleneck), MobileNetV1/V2 and DS-MBNet (SE). Transformers (ViT:
token layout, fused q/k/v, heads) and grouped convs are refused with a clear error, as is any
operation the tracer does not know how channels flow through. In a converted network the heads
of an attention layer (:class:`~dynaslice.nn.converted.ConvertedAttention`) are ordered as whole
heads (``step`` = the head size): a head's importance is the summed importance of its channels
(the output projection's columns), and each head's q, k and v rows and output columns move
together, within the head in their order.

Per-width BatchNorm statistics move with their channels (every row is permuted as a whole). Only
the largest width's row stays exact: a narrower row now describes different channels, so
recalibrate BatchNorm (:func:`dynaslice.train.recalibrate_bn`) before evaluating narrow subnets.
Reorder *before* building an optimizer or an EMA copy: their buffers are not permuted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from .counting import meta_copy
from .graph import Analysis, Layout, Member, analyze
from .graph import ChannelGroup as EngineGroup
from .models.base import Supernet
from .space import Arch
from .torch_export import trace_subnet


class OrderingError(ValueError):
    """The network has a structure channel ordering cannot follow (the message says which)."""


@dataclass
class ChannelGroup:
    """Channels that must move together, the Arch dimension that slices them, and their size.

    ``members`` are the engine's :class:`~dynaslice.graph.Member` records, with module names
    relative to the supernet: ``producer`` rows, ``consumer`` columns (their L1 norms are the
    importance), ``norm`` entries (BatchNorm parameters and per-width statistics) and
    ``channelwise`` filters (depthwise convs). ``step > 1``: the channels move in blocks of
    ``step`` (an attention layer's heads), and a member may hold them at an ``offset`` of its
    axis (q, k and v rows one after another in one projection).
    """

    dim: str
    size: int
    members: list[Member] = field(default_factory=list)
    step: int = 1

    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.role == "consumer"]


_UNSUPPORTED = (
    "channel ordering supports conv families (ResNet, MobileNetV1/V2, DS-MBNet); "
    "transformers such as ViT are out of scope"
)


def _trace(net: Supernet, arch: Arch, input_size: tuple[int, ...]) -> fx.GraphModule:
    """``net(x, arch)`` traced with sliced leaves, every node annotated with its output shape."""
    return trace_subnet(net, arch, input_size, batch=2)


def _width(node: fx.Node, layout: Layout | None) -> int | None:
    """How many channels ``node`` holds on the channel axis of ``layout`` (None: no channels)."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return None if layout is None or shape is None else int(shape[layout.axis])


def _dim_changes(net: Supernet) -> list[tuple[tuple[str, ...], Arch]]:
    """For each group of tied width dims: the largest arch with those dims at their minimum."""
    space, largest = net.space, net.space.largest()
    depth = [d.name for d in space.dims if d.kind == "depth"]
    if depth:
        raise OrderingError(f"cannot order channels of a space with depth dimensions {depth}; {_UNSUPPORTED}")
    tied = {n: g for g in space.tied for n in g}
    out, seen = [], set()
    for d in space.dims:
        if d.kind != "width" or d.name in seen or d.min == d.max:
            continue
        group = tied.get(d.name, (d.name,))
        seen.update(group)
        out.append((group, largest.replace(**{n: space[n].min for n in group})))
    return out


def channel_groups(net: Supernet, input_size: tuple[int, ...] | None = None) -> list[ChannelGroup]:
    """The sliced channel groups of ``net``: which tensor axes move together, and their dimension.

    The groups come from the one channel-group engine (:mod:`dynaslice.graph`) run on the
    largest subnet; a group is sliced when its width changes with the Arch. ``input_size``
    (``(C, H, W)``, default ``net.input_size``) only drives shape propagation. Raises
    :class:`OrderingError` for structures it cannot follow (see the module docstring).
    """
    if not isinstance(net, Supernet):
        raise TypeError(f"channel_groups needs a Supernet, got {type(net).__name__}")
    input_size = tuple(input_size or net.input_size)
    family = type(net).__name__

    def refuse(what: str) -> OrderingError:
        return OrderingError(f"cannot order the channels of {family}: {what}; {_UNSUPPORTED}")

    probe = meta_copy(net)  # the traces need shapes only: no arithmetic, and the net is untouched
    base = _trace(probe, net.space.largest(), input_size)
    analysis = analyze(base, parameters=True, sizes=True)  # a converted net's layer scales, class tokens, ...
    for node in base.graph.nodes:
        if node.op == "get_attr" and str(node.target) not in analysis.parameters:
            raise refuse(f"it reads {node.target!r} outside a leaf module")
    if analysis.stops:
        raise refuse(f"it does not know how channels flow through {analysis.stops[0]}")
    layouts = {n.name: analysis.layout(n) for n in base.graph.nodes}
    width = {n.name: _width(n, layouts[n.name]) for n in base.graph.nodes}
    sliced: dict[int, str] = {}  # engine group id -> dim name
    for dims, arch in _dim_changes(net):
        changed = _trace(probe, arch, input_size)
        if [n.name for n in changed.graph.nodes] != list(width):
            raise OrderingError(f"cannot order the channels of {family}: its graph changes with {dims}")
        for node in changed.graph.nodes:
            layout = layouts[node.name]
            w = _width(node, layout)
            if w is None or w == width[node.name]:
                continue
            if len(layout.segments) != 1 or layout.segments[0].repeat != 1:
                raise refuse(f"{node.name} concatenates or repeats sliced channels")
            group = layout.segments[0].group
            # a tied group of dims: name the one whose grid this width belongs to
            label = next((d for d in dims if net.space[d].max == width[node.name]), "+".join(dims))
            if sliced.setdefault(group, label) != label:
                raise OrderingError(
                    f"cannot order the channels of {family}: one channel group is sliced by both "
                    f"{sliced[group]} and {label}"
                )
    groups = [_checked(net, g, sliced[g.id], refuse) for g in analysis.groups.values() if g.id in sliced]
    groups += _head_groups(net, analysis)
    owner: dict[tuple[str, str, int], int] = {}
    for i, group in enumerate(groups):
        for mem in group.members:
            if owner.setdefault((mem.module, mem.attr, mem.axis), i) != i:
                raise refuse(f"{mem.module}.{mem.attr} belongs to two groups")
    return groups


def _checked(net: Supernet, group: EngineGroup, dim: str, refuse) -> ChannelGroup:  # noqa: ANN001
    """``group`` with module names relative to ``net``, once every member is a plain axis of a
    tensor that holds exactly the group's channels (what a permutation can move)."""
    if group.step != 1:
        raise refuse(f"{group.name} is a grouped conv's channels (sliced in whole conv groups)")
    # the supernet is traced as ``net``: its own parameters (a class token) belong to module "net"
    members = [
        replace(m, module="" if m.module == "net" else m.module.removeprefix("net.")) for m in group.members
    ]
    for mem in members:
        if mem.offset or mem.repeat != 1:
            raise refuse(f"{mem.module} reads the channels of {group.name} concatenated or repeated")
        t = getattr(net.get_submodule(mem.module), mem.attr)
        if t.shape[mem.axis] != group.size:
            raise OrderingError(
                f"cannot order the channels of {type(net).__name__}: {mem.module}.{mem.attr} stores "
                f"{t.shape[mem.axis]} channels but the largest subnet uses {group.size}"
            )
    return ChannelGroup(dim, group.size, members)


def _head_groups(net: Supernet, analysis: Analysis) -> list[ChannelGroup]:
    """The heads of each attention layer whose ``<layer>.heads`` dimension the space has: inside
    the layer, no tensor's width shows them, so the shape probes above cannot find them."""
    out = []
    for layer, gid in analysis.heads.items():
        dim = f"{layer.removeprefix('net.')}.heads"
        if dim in net.space.names:
            group = analysis.groups[gid]
            members = [replace(m, module=m.module.removeprefix("net.")) for m in group.members]
            out.append(ChannelGroup(dim, group.size, members, group.step))
    return out


def _l1(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.detach().abs().transpose(0, axis).flatten(1).sum(1).float()


def channel_importance(net: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Importance of each channel of ``group``: the sum over its consumers of the L1 norm of the
    input slice each reads (``sum |W[:, c]|``), each consumer normalised to sum 1 first.

    A group without consumers (none in the supported families) falls back to its producers' rows.
    """
    members = group.consumers() or [m for m in group.members if m.role == "producer" and m.attr == "weight"]
    if not members:
        raise OrderingError(f"the channel group of {group.dim} has neither consumers nor producers")
    total = torch.zeros(group.size)
    for m in members:
        imp = _l1(getattr(net.get_submodule(m.module), m.attr), m.axis).cpu()
        imp = imp[m.offset : m.offset + group.size]
        total += imp / imp.sum().clamp_min(1e-12)
    return total


@torch.no_grad()
def permute_group(net: nn.Module, group: ChannelGroup, perm: torch.Tensor) -> None:
    """Apply ``perm`` (new position -> old channel) to every tensor axis of ``group``, in place
    (to the ``group.size`` positions from each member's ``offset``; the rest stay).

    The tensors keep their identity (``copy_``), so references held elsewhere stay valid.
    """
    for m in group.members:
        t = getattr(net.get_submodule(m.module), m.attr)
        index = torch.arange(t.shape[m.axis])
        index[m.offset : m.offset + group.size] = m.offset + perm.cpu()
        t.copy_(t.index_select(m.axis, index.to(t.device)))


def reorder_channels(
    net: Supernet, input_size: tuple[int, ...] | None = None
) -> list[tuple[ChannelGroup, torch.Tensor]]:
    """Sort every sliced channel group of ``net`` by importance, most important first, in place.

    The largest subnet computes the same function afterwards (up to float rounding). Returns
    each group with its permutation (new position -> old channel). Recalibrate BatchNorm before
    evaluating narrower subnets, and build optimizers and EMA copies afterwards (module docstring).
    """
    out = []
    for group in channel_groups(net, input_size):
        importance = channel_importance(net, group)
        if group.step == 1:
            perm = torch.argsort(importance, descending=True, stable=True)
        else:  # whole blocks (heads) by their summed importance, each block's channels in order
            blocks = torch.argsort(importance.view(-1, group.step).sum(1), descending=True, stable=True)
            perm = (blocks[:, None] * group.step + torch.arange(group.step)).flatten()
        permute_group(net, group, perm)
        out.append((group, perm))
    return out


def describe_groups(groups: list[ChannelGroup]) -> Mapping[str, list[int]]:
    """``dim -> [size of each group it slices]``: a compact summary for logs and tests."""
    out: dict[str, list[int]] = {}
    for g in groups:
        out.setdefault(g.dim, []).append(g.size)
    return out
