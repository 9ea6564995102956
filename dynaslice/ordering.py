"""Channel-importance ordering: put the most important channels first before slicing.

A subnet keeps the *first* ``k`` channels of every sliced dimension. In a network trained alone
(or a supernet started from one) nothing makes the first channels the important ones, so its
narrow slices are poor. Once-for-all's progressive shrinking sorts each sliced dimension by
importance before elastic-width training (``re_organize_middle_weights``): the importance of a
channel is the L1 norm of what its *consumers* read from it (``sum |W_next[:, c]|``), and the
producer's rows, the BatchNorm parameters and statistics and every consumer's input columns are
permuted together, which leaves the largest subnet's function unchanged.

One mechanism serves every conv family. :func:`channel_groups` traces the largest subnet with
``torch.fx`` (sliced layers as leaves, as :func:`dynaslice.extract_subnet` does) and follows the
channel axis through the graph: a conv or linear layer starts a new group of channels, BatchNorm,
depthwise convs, activations and pooling keep it, and ``add``/``mul`` join the groups of their
operands (union-find), so a residual stream or a squeeze-and-excitation scale becomes one tied
group. A group is sliced when its width changes with the Arch; which dimension slices it is
found by re-tracing with that dimension at its minimum. For a tied group the importance is the
sum over its consumers of each one's L1 importance normalised to sum 1 (as NNCF BootstrapNAS and
ModelOpt do), so a layer with larger weights does not outvote the others.

Supported: ResNet (basic and bottleneck), MobileNetV1/V2 and DS-MBNet (SE). Transformers (ViT:
token layout, fused q/k/v, heads) and grouped convs are refused with a clear error, as is any
operation the tracer does not know how channels flow through.

Per-width BatchNorm statistics move with their channels (every row is permuted as a whole). Only
the largest width's row stays exact: a narrower row now describes different channels, so
recalibrate BatchNorm (:func:`dynaslice.train.recalibrate_bn`) before evaluating narrow subnets.
Reorder *before* building an optimizer or an EMA copy: their buffers are not permuted.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .export import _Bound, _Tracer
from .models.base import Supernet
from .nn import SlicedBatchNorm2d, SlicedConv2d, SlicedLinear
from .space import Arch


class OrderingError(ValueError):
    """The network has a structure channel ordering cannot follow (the message says which)."""


@dataclass(frozen=True)
class Member:
    """One tensor axis that holds a group's channels: ``module.attr`` along ``axis``.

    ``role``: ``producer`` (writes the channels: output rows of a conv/linear), ``consumer``
    (reads them: input columns; its L1 norms are the importance) or ``member`` (per-channel
    values: BatchNorm parameters and statistics, depthwise kernels).
    """

    module: str
    attr: str
    axis: int
    role: str


@dataclass
class ChannelGroup:
    """Channels that must move together, the Arch dimension that slices them, and their size."""

    dim: str
    size: int
    members: list[Member] = field(default_factory=list)

    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.role == "consumer"]


_KEEP_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)
_KEEP_FUNCTIONS = {
    torch.relu,
    torch.sigmoid,
    torch.flatten,
    F.relu,
    F.relu6,
    F.silu,
    F.hardswish,
    F.adaptive_avg_pool2d,
    F.avg_pool2d,
    F.max_pool2d,
    F.dropout,
}
_KEEP_METHODS = {"mean", "flatten", "relu", "sigmoid", "contiguous"}
_JOIN_FUNCTIONS = {operator.add, operator.mul, operator.iadd, operator.imul, torch.add, torch.mul}
_UNSUPPORTED = (
    "channel ordering supports conv families (ResNet, MobileNetV1/V2, DS-MBNet); "
    "transformers such as ViT are out of scope"
)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, a: str) -> str:
        self.parent.setdefault(a, a)
        return a

    def find(self, a: str) -> str:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra


def _trace(net: Supernet, arch: Arch, input_size: tuple[int, ...]) -> fx.GraphModule:
    """``net(x, arch)`` traced with sliced leaves, every node annotated with its output shape."""
    bound = _Bound(net, arch)
    traced = fx.GraphModule(bound, _Tracer().trace(bound))
    param = next(net.parameters())
    example = torch.zeros(2, *input_size, dtype=param.dtype, device=param.device)
    modes = {m: m.training for m in net.modules()}
    net.eval()  # shape propagation must not touch BN statistics
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(example)
    finally:
        for m, training in modes.items():
            m.training = training
    return traced


def _channels(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def _is_tensor(arg: object) -> bool:
    return isinstance(arg, fx.Node) and _channels(arg) is not None


class _GraphWalk:
    """Union-find of channel groups over one traced graph, plus the tensor axes in each group."""

    def __init__(self, traced: fx.GraphModule, family: str):
        self.traced, self.family = traced, family
        self.uf = _UnionFind()
        self.members: dict[str, list[Member]] = {}  # node name of a group's first tensor -> members
        for node in traced.graph.nodes:
            self._visit(node)

    def _refuse(self, what: str) -> OrderingError:
        return OrderingError(f"cannot order the channels of {self.family}: {what}; {_UNSUPPORTED}")

    def _new(self, node: fx.Node, *members: Member) -> None:
        self.uf.add(node.name)
        self.members[node.name] = list(members)

    def _add(self, node: fx.Node, *members: Member) -> None:
        """Record tensor axes that hold the channels of ``node``'s group."""
        self.members.setdefault(self.uf.find(node.name), []).extend(members)

    def _same(self, node: fx.Node, src: fx.Node, *members: Member) -> None:
        """``node`` carries the channels of ``src`` (same group), plus ``members``."""
        if _channels(node) != _channels(src):
            raise self._refuse(f"{node.op} {node.target!r} changes the channel count")
        self.uf.add(node.name)
        self.uf.union(src.name, node.name)
        self._add(node, *members)

    def _visit(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            raise self._refuse(f"it reads {node.target!r} outside a leaf module")
        if node.op == "output" or _channels(node) is None:
            return
        if node.op == "placeholder":
            self._new(node)
        elif node.op == "call_module":
            self._module(node)
        elif node.op == "call_function" and node.target in _JOIN_FUNCTIONS:
            tensors = [a for a in node.args if _is_tensor(a)]
            self._same(node, tensors[0])
            for other in tensors[1:]:
                self._same(node, other)
        elif node.op == "call_function" and node.target in _KEEP_FUNCTIONS:
            self._same(node, node.args[0])
        elif node.op == "call_method" and node.target in _KEEP_METHODS:
            self._same(node, node.args[0])
        else:
            raise self._refuse(f"it does not know how channels flow through {node.op} {node.target!r}")

    def _module(self, node: fx.Node) -> None:
        name = str(node.target).removeprefix("net.")
        m = self.traced.get_submodule(str(node.target))
        x = node.args[0]
        bias = [] if getattr(m, "bias", None) is None else ["bias"]
        depthwise = isinstance(m, SlicedConv2d | nn.Conv2d) and m.groups == m.in_channels == m.out_channels
        if depthwise and m.groups > 1:
            self._same(node, x, *(Member(name, a, 0, "member") for a in ["weight", *bias]))
        elif isinstance(m, SlicedConv2d | nn.Conv2d | SlicedLinear | nn.Linear):
            if getattr(m, "groups", 1) != 1:
                raise self._refuse(f"{name} is a grouped conv")
            if getattr(m, "chunks", 1) != 1:
                raise self._refuse(f"{name} stacks several projections (fused q/k/v)")
            self._add(x, Member(name, "weight", 1, "consumer"))
            self._new(node, *(Member(name, a, 0, "producer") for a in ["weight", *bias]))
        elif isinstance(m, SlicedBatchNorm2d | nn.BatchNorm2d):
            stat_axis = 1 if isinstance(m, SlicedBatchNorm2d) else 0
            self._same(
                node,
                x,
                Member(name, "weight", 0, "member"),
                Member(name, "bias", 0, "member"),
                Member(name, "running_mean", stat_axis, "member"),
                Member(name, "running_var", stat_axis, "member"),
            )
        elif isinstance(m, _KEEP_MODULES):
            self._same(node, x)
        else:
            raise self._refuse(f"it does not know how channels flow through {type(m).__name__} ({name})")

    def groups(self) -> dict[str, tuple[list[str], list[Member]]]:
        """Root -> (node names, members) of every group."""
        out: dict[str, tuple[list[str], list[Member]]] = {}
        for node_name in self.uf.parent:
            root = self.uf.find(node_name)
            out.setdefault(root, ([], []))[0].append(node_name)
        for key, members in self.members.items():
            out[self.uf.find(key)][1].extend(members)
        return out


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

    ``input_size`` (``(C, H, W)``, default ``net.input_size``) only drives shape propagation.
    Raises :class:`OrderingError` for structures it cannot follow (see the module docstring).
    """
    if not isinstance(net, Supernet):
        raise TypeError(f"channel_groups needs a Supernet, got {type(net).__name__}")
    input_size = tuple(input_size or net.input_size)
    family = type(net).__name__
    largest = net.space.largest()
    base = _trace(net, largest, input_size)
    walk = _GraphWalk(base, family)
    width = {n.name: _channels(n) for n in base.graph.nodes}
    sliced: dict[str, str] = {}  # group root -> dim name
    for dims, arch in _dim_changes(net):
        changed = _trace(net, arch, input_size)
        names = [n.name for n in changed.graph.nodes]
        if names != list(width):
            raise OrderingError(f"cannot order the channels of {family}: its graph changes with {dims}")
        for node in changed.graph.nodes:
            w = _channels(node)
            if w is None or w == width[node.name]:
                continue
            root = walk.uf.find(node.name)
            # a tied group of dims: name the one whose grid this width belongs to
            label = next((d for d in dims if net.space[d].max == width[node.name]), "+".join(dims))
            if sliced.setdefault(root, label) != label:
                raise OrderingError(
                    f"cannot order the channels of {family}: one channel group is sliced by both "
                    f"{sliced[root]} and {label}"
                )
    groups = []
    owner: dict[tuple[str, str, int], str] = {}
    for root, (nodes, members) in walk.groups().items():
        if root not in sliced:
            continue
        widths = {width[n] for n in nodes}
        if len(widths) != 1:
            raise OrderingError(f"cannot order the channels of {family}: a tied group has widths {widths}")
        size = widths.pop()
        unique = list(dict.fromkeys(members))
        for mem in unique:
            key = (mem.module, mem.attr, mem.axis)
            if owner.setdefault(key, root) != root:
                raise OrderingError(
                    f"cannot order the channels of {family}: {mem.module}.{mem.attr} belongs to two groups"
                )
            t = getattr(net.get_submodule(mem.module), mem.attr)
            if t.shape[mem.axis] != size:
                raise OrderingError(
                    f"cannot order the channels of {family}: {mem.module}.{mem.attr} stores "
                    f"{t.shape[mem.axis]} channels but the largest subnet uses {size}"
                )
        groups.append(ChannelGroup(sliced[root], size, unique))
    return groups


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
        total += imp / imp.sum().clamp_min(1e-12)
    return total


@torch.no_grad()
def permute_group(net: nn.Module, group: ChannelGroup, perm: torch.Tensor) -> None:
    """Apply ``perm`` (new position -> old channel) to every tensor axis of ``group``, in place.

    The tensors keep their identity (``copy_``), so references held elsewhere stay valid.
    """
    for m in group.members:
        t = getattr(net.get_submodule(m.module), m.attr)
        t.copy_(t.index_select(m.axis, perm.to(t.device)))


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
        perm = torch.argsort(channel_importance(net, group), descending=True, stable=True)
        permute_group(net, group, perm)
        out.append((group, perm))
    return out


def describe_groups(groups: list[ChannelGroup]) -> Mapping[str, list[int]]:
    """``dim -> [size of each group it slices]``: a compact summary for logs and tests."""
    out: dict[str, list[int]] = {}
    for g in groups:
        out.setdefault(g.dim, []).append(g.size)
    return out
