"""Channel groups: which channels of a traced network must keep the same width (and order).

One walk over a ``torch.fx`` graph with shapes (:func:`dynaslice.graph.trace`) follows the
channel axis of every tensor. A conv or linear layer *produces* a new group of channels; norms,
activations, pooling and depthwise convs keep it; an elementwise ``+``/``*`` ties the groups of
its operands (a residual stream, a squeeze-and-excitation scale) with a union-find. The walk
records every tensor axis that holds a group's channels (:class:`Member`), which is what
slicing, pruning and reordering channels all need.

Two ideas carry the less common layers without special cases:

- A tensor's channel axis has a *layout*: a sequence of segments, each the channels of one group
  with a *repeat* (how many consecutive positions each channel occupies). A concatenation puts
  segments side by side (DenseNet, SqueezeNet's fire modules); a flatten after pooling to
  ``H x W`` repeats each channel ``H*W`` times (a VGG-style classifier); a depthwise conv with a
  channel multiplier ``m`` repeats it ``m`` times. Keeping the first ``w`` channels of a group is
  then always a union of contiguous ranges, one per segment.
- A grouped conv keeps whole conv groups: its channels are sliced in steps of the channels per
  conv group (the group's ``step``), so a subnet drops whole conv groups. GroupNorm likewise.

Anything the walk cannot follow -- an op missing from :mod:`dynaslice.graph.rules`, a reshape to
a fixed size, a channel shuffle, code that reads a channel count -- makes the groups around it
*fixed*, with the reason, rather than guessing: a fixed group keeps its full width, so the
network stays exactly the original there. The model's input and output are fixed too.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx, nn

from . import rules


@dataclass(frozen=True)
class Segment:
    """Part of a channel axis: the channels of group ``group``, each repeated ``repeat`` times."""

    group: int
    repeat: int = 1


@dataclass(frozen=True)
class Layout:
    """Where a tensor's channels lie: on ``axis``, as ``segments`` one after another."""

    axis: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Member:
    """One tensor axis that holds a group's channels: ``module.attr`` along ``axis``.

    ``role``: ``producer`` (output rows of a conv/linear: writes the channels), ``consumer``
    (input columns: reads them), ``norm`` (per-channel parameters and statistics),
    ``channelwise`` (the filters of a depthwise or grouped conv) or ``param`` (a parameter read
    outside a layer and combined elementwise with the channels: a layer scale, a class token).
    For a parameter read outside a layer, ``module`` is the module that owns it. Channel ``c`` occupies positions
    ``offset + c*repeat ... offset + (c+1)*repeat - 1`` of that axis.
    """

    module: str
    attr: str
    axis: int
    role: str
    offset: int = 0
    repeat: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must keep the same width (and order) together.

    ``name`` is the first layer that produces them (``layer1.0.conv1``), ``size`` their number,
    ``step`` the multiple any width must be (grouped convs, GroupNorm), ``fixed`` why they must
    keep their full width (``None``: they may be sliced), ``residual`` whether an add ties them.
    """

    id: int
    name: str
    size: int
    step: int
    members: tuple[Member, ...]
    fixed: str | None
    residual: bool

    def modules(self, role: str) -> tuple[str, ...]:
        """Names of the modules that touch the channels in ``role``, in graph order, once each."""
        return tuple(dict.fromkeys(m.module for m in self.members if m.role == role))


def _shape(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _move_axes(
    before: tuple[int, ...], dims: tuple[int | None, ...], after: tuple[int, ...]
) -> tuple[int | None, ...] | None:
    """The parameter dims of ``after``'s axes when a reshape only adds or drops size-1 axes
    (the axes of size > 1 stay, in order); None for any other reshape."""
    kept = [(size, d) for size, d in zip(before, dims, strict=True) if size != 1]
    if [size for size, _ in kept] != [size for size in after if size != 1]:
        return None
    it = iter(kept)
    return tuple(None if size == 1 else next(it)[1] for size in after)


def describe(node: fx.Node) -> str:
    """``<op> (<node>) in <module path>``: where a node comes from, for one-line messages
    (a layer is named by its own path)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    where = next(reversed(stack.values()), None)
    path = where[0] if isinstance(where, tuple) else None
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name}) in {path}" if path else f"{target} ({node.name})"


class _Walk:
    """Union-find over channel groups while walking the graph once, in order.

    With ``parameters``, a parameter read outside a layer (a ``get_attr`` node) is followed
    through the ops that only move its axes (reshape to insert size-1 axes, expand, casts) to
    where it meets channels: an elementwise op or a concatenation on another axis (a layer
    scale, a class token, a position embedding) or the weight of ``F.layer_norm`` /
    ``F.group_norm`` / ``F.linear`` / ``F.conv2d``. Its axis there joins the group
    (``param_ties``). A parameter read any other way (``param_bad``) keeps the groups it
    touches whole: it would be read at full width beside sliced channels.
    """

    def __init__(self, gm: fx.GraphModule, parameters: bool = False, sizes: bool = False):
        self.gm = gm
        self.parameters, self.sizes = parameters, sizes
        self.written: dict[fx.Node, int] = {}  # reshape -> the channel axis whose count it writes
        self.param_map: dict[fx.Node, tuple[str, tuple[int | None, ...]]] = {}  # node axis -> parameter dim
        self.param_ties: dict[tuple[str, int], Layout] = {}  # (parameter, dim) -> its channels
        self.param_bad: dict[str, str] = {}  # parameter -> the op the walk could not follow
        self._used: set[fx.Node] = set()  # parameter-derived inputs the current node ties
        self.parent: list[int] = []
        self.size: list[int] = []
        self.step: list[int] = []
        self.name: list[str | None] = []
        self.fixed: list[str | None] = []
        self.residual: list[bool] = []
        self.members: list[list[Member]] = []
        self.layout: dict[fx.Node, Layout | None] = {}
        self.calls: dict[str, list[fx.Node]] = defaultdict(list)
        self.heads: dict[str, int] = {}  # attention layer -> the group of its heads' channels
        self.tuples: set[fx.Node] = set()  # attention calls returning (output, weights)
        self.stops: list[str] = []  # where the walk could not follow channels, in graph order
        for node in gm.graph.nodes:
            self._used = set()
            self.visit(node)
            for a in node.all_input_nodes:
                if a in self.param_map and a not in self._used and node not in self.param_map:
                    self.param_bad.setdefault(self.param_map[a][0], describe(node))
        self._shared_modules()
        for (name, _), layout in self.param_ties.items():
            if name in self.param_bad:
                self.stop(layout, f"parameter {name} is read by {self.param_bad[name]}")

    # --- union-find ---------------------------------------------------------------------------
    def new(self, size: int, producer: str | None = None, fixed: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.step.append(1)
        self.name.append(producer)
        self.fixed.append(fixed)
        self.residual.append(False)
        self.members.append([])
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        first, second = min(a, b), max(a, b)  # the earlier group keeps its name
        self.parent[second] = first
        self.members[first] += self.members[second]
        self.step[first] = math.lcm(self.step[first], self.step[second])
        self.name[first] = self.name[first] or self.name[second]
        self.fixed[first] = self.fixed[first] or self.fixed[second]
        self.residual[first] |= self.residual[second]
        return first

    def fix(self, layout: Layout | None, reason: str) -> None:
        for seg in layout.segments if layout else ():
            root = self.find(seg.group)
            self.fixed[root] = self.fixed[root] or reason

    def add(self, layout: Layout, module: str, attr: str, axis: int, role: str) -> None:
        """Record that ``module.attr`` holds the channels of ``layout`` along ``axis``."""
        offset = 0
        for seg in layout.segments:
            root = self.find(seg.group)
            self.members[root].append(Member(module, attr, axis, role, offset, seg.repeat))
            offset += self.size[root] * seg.repeat

    def fresh(
        self, node: fx.Node, size: int, axis: int = 1, producer: str | None = None, fixed: str | None = None
    ) -> None:
        """``node`` holds a new group of ``size`` channels on ``axis``."""
        self.layout[node] = Layout(axis, (Segment(self.new(size, producer, fixed)),))

    # --- the walk -----------------------------------------------------------------------------
    def stop(self, layout: Layout | None, reason: str) -> None:
        """The walk cannot follow these channels: they keep their full width, and ``reason`` is noted."""
        self.stops.append(reason)
        self.fix(layout, reason)

    def opaque(self, node: fx.Node, reason: str) -> None:
        """``node`` does something to channels the walk cannot follow: keep them all at full width."""
        self.stops.append(reason)
        for a in node.all_input_nodes:
            self.fix(self.layout.get(a), reason)
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            # channels where an input of the same shape has them; without any input with channels
            # (an attention layer's output, read from its tuple) on the last axis of a token stream
            # [batch, tokens, channels]; on axis 1 otherwise
            laid = [a for a in node.all_input_nodes if self.layout.get(a)]
            same = (self.layout[a].axis for a in laid if _shape(a) == shape)
            axis = next(same, 2 if len(shape) == 3 and not laid else 1)
            self.fresh(node, shape[axis], axis, fixed=reason)
        else:
            self.layout[node] = None

    def visit(self, node: fx.Node) -> None:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is not None and len(shape) >= 2:
                self.fresh(node, shape[1], fixed="the model's input")
            return
        if node.op == "output":
            for a in node.all_input_nodes:
                self.fix(self.layout.get(a), "the model's output")
            return
        if node.op == "get_attr":
            self.layout[node] = None
            if self.parameters and shape is not None and isinstance(self._attr(node), nn.Parameter):
                self.param_map[node] = (str(node.target), tuple(range(len(shape))))
            return
        if not any(self.layout.get(a) for a in node.all_input_nodes):
            self._without_channels(node)
        elif node.op == "call_module":
            self._module(node)
        else:
            self._function(node)

    def _attr(self, node: fx.Node) -> object:
        owner, _, attr = str(node.target).rpartition(".")
        return getattr(self.gm.get_submodule(owner), attr, None)

    def _without_channels(self, node: fx.Node) -> None:
        """A node none of whose inputs carries channels (sizes, constants, parameters)."""
        if self._param_op(node):
            return
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:  # a tensor made here: its channels stay as they are
            self.opaque(node, f"{describe(node)} makes a tensor from parameters or constants")
        else:
            self.layout[node] = None

    def _same(self, node: fx.Node, src: fx.Node) -> None:
        self.layout[node] = self.layout[src]

    def _module(self, node: fx.Node) -> None:
        m = self.gm.get_submodule(str(node.target))
        name = str(node.target)
        self.calls[name].append(node)
        x = node.args[0] if node.args else None
        layout = self.layout.get(x)
        extra = [a for a in node.all_input_nodes if a is not x and self.layout.get(a)]
        if layout is None or extra:
            return self.opaque(node, f"{name} ({type(m).__name__}) takes several tensors")
        ndim = len(_shape(x))
        spec = rules.attention_spec(m)
        if spec is not None:
            return self._attention(node, m, name, spec, layout)
        if isinstance(m, rules.CONVS) and getattr(m, "padding_mode", "zeros") == "zeros":
            return self._conv(node, m, name, layout)
        if isinstance(m, rules.LINEARS) and getattr(m, "chunks", 1) == 1:
            if layout.axis != ndim - 1:
                return self.opaque(node, f"{name} reads channels that are not on the last axis")
            self.add(layout, name, "weight", 1, "consumer")
            self.fresh(node, _shape(node)[-1], len(_shape(node)) - 1, producer=name)
            self._produce(node, m, name)
            return None
        kind = rules.norm_kind(m)
        if kind == "batch" and layout.axis == 1:
            return self._norm(node, m, name, layout, rules.norm_attrs(m))
        if kind == "layer" and layout.axis == ndim - 1 and len(getattr(m, "normalized_shape", (0,))) == 1:
            return self._norm(node, m, name, layout, rules.norm_attrs(m))
        if kind == "group" and layout.axis == 1 and len(layout.segments) == 1:
            seg = layout.segments[0]
            per_group = rules.channels_per_group(m)
            if per_group % seg.repeat == 0:
                root = self.find(seg.group)
                self.step[root] = math.lcm(self.step[root], per_group // seg.repeat)
                return self._norm(node, m, name, layout, rules.norm_attrs(m))
        if rules.is_pointwise_module(m):
            return self._same(node, x)
        if isinstance(m, rules.SPATIAL_MODULES) and layout.axis == 1:
            return self._same(node, x)
        if isinstance(m, nn.Flatten):
            return self._flatten(node, x, m.start_dim, m.end_dim)
        return self.opaque(node, f"{name} ({type(m).__name__})")

    def _attention(
        self, node: fx.Node, m: nn.Module, name: str, spec: rules.AttentionSpec, layout: Layout
    ) -> None:
        """A self-attention layer: it reads its input's channels (the q/k/v projection's columns),
        writes a new group (the output projection's rows), and its heads are a group of their own,
        sliced in whole heads (``step`` = the head size): the q, k and v rows of the first heads
        (three ranges of the projection, at offsets 0, ``width``, 2 ``width``) and the output
        projection's matching columns. Attention weights that are read would change with the
        heads: such a call, and any :func:`~dynaslice.graph.rules.attention_refusal`, stays whole."""
        why = rules.attention_refusal(m, node.args, node.kwargs)
        if why is None and layout.axis != len(_shape(node.args[0])) - 1:
            why = "its input's channels are not on the last axis"
        if (
            why is None
            and spec.tuple_out
            and any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in node.users)
        ):
            why = "its attention weights are read"
        if why is not None:
            return self.opaque(node, f"{name} ({type(m).__name__}): {why}")
        qkv = f"{name}.{spec.qkv}" if spec.qkv else name
        proj = f"{name}.{spec.proj}"
        self.add(layout, qkv, spec.qkv_weight, 1, "consumer")
        heads = self.new(spec.width, producer=f"{name}.heads")
        self.step[heads] = spec.head_dim
        attrs = [spec.qkv_weight] + (
            [spec.qkv_bias] if getattr(self.gm.get_submodule(qkv), spec.qkv_bias) is not None else []
        )
        for attr in attrs:
            self.members[heads] += [Member(qkv, attr, 0, "producer", i * spec.width) for i in range(3)]
        self.members[heads].append(Member(proj, "weight", 1, "consumer"))
        self.heads[name] = heads
        meta = node.meta.get("tensor_meta")
        shape = tuple((meta if hasattr(meta, "shape") else meta[0]).shape)  # a tensor's, or the tuple's first
        self.fresh(node, shape[-1], len(shape) - 1, producer=proj)
        self._produce(node, self.gm.get_submodule(proj), proj)
        if spec.tuple_out:
            self.tuples.add(node)
        return None

    def _produce(self, node: fx.Node, m: nn.Module, name: str) -> None:
        layout = self.layout[node]
        for attr in ("weight", "bias"):
            if getattr(m, attr, None) is not None:
                self.add(layout, name, attr, 0, "producer")

    def _norm(self, node: fx.Node, m: nn.Module, name: str, layout: Layout, attrs: list) -> None:
        for attr, axis in attrs:
            if getattr(m, attr, None) is not None:
                self.add(layout, name, attr, axis, "norm")
        self.layout[node] = layout

    def _conv(self, node: fx.Node, m: nn.Module, name: str, layout: Layout) -> None:
        if layout.axis != 1:
            return self.opaque(node, f"{name} reads channels that are not on axis 1")
        # widths from the shapes: a sliced leaf's module holds its largest width, not this call's
        cin, cout = _shape(node.args[0])[1], _shape(node)[1]
        groups = cin if getattr(m, "depthwise", False) else m.groups
        if groups == 1:
            self.add(layout, name, "weight", 1, "consumer")
            self.fresh(node, cout, producer=name)
            return self._produce(node, m, name)
        seg = layout.segments[0]
        per_group = cin // groups
        if len(layout.segments) != 1 or cout % cin or per_group % seg.repeat:
            return self.opaque(node, f"grouped conv {name} ({cin} -> {cout} channels in {groups} groups)")
        root = self.find(seg.group)
        self.step[root] = math.lcm(self.step[root], per_group // seg.repeat)
        out = Layout(1, (Segment(root, seg.repeat * (cout // cin)),))
        for attr in ("weight", "bias"):
            if getattr(m, attr, None) is not None:
                self.add(out, name, attr, 0, "channelwise")
        self.layout[node] = out
        return None

    def _function(self, node: fx.Node) -> None:  # noqa: C901 - one dispatch over the rule table
        op, target = node.op, node.target
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        layout = self.layout.get(x) if x is not None else None
        if x in self.tuples and op == "call_function" and target is operator.getitem:
            self.layout[node] = layout if node.args[1] == 0 else None  # (output, unread weights)
            return None
        if rules.matches(op, target, (rules.JOIN_FUNCTIONS, rules.JOIN_METHODS)):
            return self._join(node)
        if op == "call_function" and target in rules.CONCAT_FUNCTIONS:
            return self._concat(node)
        if layout is None or any(a is not x and self.layout.get(a) for a in node.all_input_nodes):
            return self.opaque(node, f"{describe(node)} mixes tensors")
        if self.parameters and op == "call_function" and target in rules.FUNCTIONAL_LAYERS:
            return self._functional(node, x, layout)
        if rules.matches(op, target, (rules.POINTWISE_FUNCTIONS, rules.POINTWISE_METHODS)):
            return self._same(node, x)
        if op == "call_function" and target in rules.SPATIAL_FUNCTIONS and layout.axis == 1:
            return self._same(node, x)
        if rules.matches(op, target, rules.FLATTEN):
            return self._flatten(node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if op == "call_method" and target in rules.RESHAPE_METHODS:
            return self._reshape(node, x, layout)
        if rules.matches(op, target, rules.PERMUTE):
            dims = node.args[1:] if op == "call_method" else (_arg(node, 1, "dims"),)
            dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], tuple | list) else tuple(dims)
            ndim = len(_shape(x))
            order = [d % ndim for d in dims]
            self.layout[node] = Layout(order.index(layout.axis), layout.segments)
            return None
        if rules.matches(op, target, rules.TRANSPOSE):
            ndim = len(_shape(x))
            a, b = (_arg(node, 1, "dim0") % ndim, _arg(node, 2, "dim1") % ndim)
            axis = b if layout.axis == a else a if layout.axis == b else layout.axis
            self.layout[node] = Layout(axis, layout.segments)
            return None
        if rules.matches(op, target, rules.REDUCE):
            return self._reduce(node, x, layout)
        if rules.matches(op, target, rules.SOFTMAX):
            dim = _arg(node, 1, "dim")
            if dim is not None and dim % len(_shape(x)) != layout.axis:
                return self._same(node, x)
            return self.opaque(node, f"{describe(node)} mixes channels")
        if (op == "call_method" and target == "size") or (op == "call_function" and target is getattr):
            return self._size(node, x, layout)
        if op == "call_method" and target in rules.SAME_SHAPE_METHODS:
            return self._same(node, x) if _shape(node) == _shape(x) else None
        if op == "call_function" and target is operator.getitem:
            return self._index(node, x, layout)
        return self.opaque(node, describe(node))

    def _join(self, node: fx.Node) -> None:
        """Broadcasting elementwise ops: operands whose channel axes line up are tied."""
        out = _shape(node)
        if out is None:
            return self.opaque(node, f"{describe(node)} on non-tensors")
        tensors = [a for a in node.all_input_nodes if _shape(a) is not None]
        laid = [a for a in tensors if self.layout.get(a)]
        axes = {len(out) - len(_shape(a)) + self.layout[a].axis for a in laid}
        if len(axes) != 1:
            return self.opaque(node, f"{describe(node)} combines channels on different axes")
        axis = axes.pop()
        full, params = [], []
        for a in tensors:
            k = axis - (len(out) - len(_shape(a)))
            if k < 0 or _shape(a)[k] == 1:
                continue  # broadcast along the channels: not tied
            if a not in laid and a in self.param_map and self.param_map[a][1][k] is not None:
                params.append((a, k))  # a layer scale, a class token: tied once the channels are known
                continue
            if a not in laid or self.layout[a].axis != k:
                return self.opaque(
                    node, f"{describe(node)} combines channels with a tensor the walk cannot place"
                )
            full.append(self.layout[a])
        ref = full[0] if full else self.layout[laid[0]]
        for other in full[1:]:
            pairs = list(zip(ref.segments, other.segments, strict=False))
            if len(ref.segments) != len(other.segments) or any(
                a.repeat != b.repeat or self.size[self.find(a.group)] != self.size[self.find(b.group)]
                for a, b in pairs
            ):
                return self.opaque(node, f"{describe(node)} combines differently laid-out channels")
            for a, b in pairs:
                root = self.union(a.group, b.group)
                if len(full) > 1 and node.target in rules.ADDITIVE:
                    self.residual[root] = True
        for a, k in params:
            if not self._tie(a, k, ref):
                return self.opaque(
                    node, f"{describe(node)} combines channels with a parameter laid out otherwise"
                )
        self.layout[node] = Layout(axis, ref.segments)
        return None

    def _concat(self, node: fx.Node) -> None:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        laid = [t for t in tensors if self.layout.get(t)] if isinstance(tensors, list | tuple) else []
        if not laid or any(t not in laid and t not in self.param_map for t in tensors):
            return self.opaque(node, f"{describe(node)} concatenates tensors the walk cannot place")
        axes = {self.layout[t].axis for t in laid}
        if len(axes) != 1:
            return self.opaque(node, f"{describe(node)} concatenates channels on different axes")
        axis = axes.pop()
        if dim % len(_shape(node)) != axis:
            return self._join(node)  # along another axis (tokens): a class token's channels are tied
        if len(laid) != len(tensors):
            return self.opaque(node, f"{describe(node)} concatenates channels with a parameter")
        segments = tuple(s for t in tensors for s in self.layout[t].segments)
        self.layout[node] = Layout(axis, segments)
        return None

    def _flatten(self, node: fx.Node, x: fx.Node, start: int, end: int) -> None:
        shape, layout = _shape(x), self.layout[x]
        start, end = start % len(shape), end % len(shape)
        if layout.axis < start:
            return self._same(node, x)
        if layout.axis > end:
            self.layout[node] = Layout(layout.axis - (end - start), layout.segments)
            return None
        if math.prod(shape[start : layout.axis]) != 1:
            return self.opaque(node, f"{describe(node)} flattens channels into a larger axis")
        inner = math.prod(shape[layout.axis + 1 : end + 1])
        segments = tuple(Segment(s.group, s.repeat * inner) for s in layout.segments)
        self.layout[node] = Layout(start, segments)
        return None

    def _reshape(self, node: fx.Node, x: fx.Node, layout: Layout) -> None:
        """Only reshapes that are a flatten from the channel axis on, with no size written in
        the code (a literal size would break once the channels are sliced). With ``sizes``, also
        one that keeps every axis up to the channel axis and reshapes only those after it (a
        patch embedding's ``x.reshape(n, hidden_dim, h * w)``) when the one size written at the
        channel axis is the channel count: the caller writes the width there (``written``)."""
        before, after = _shape(x), _shape(node)
        sizes = node.args[1:]
        sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], tuple | list) else tuple(sizes)
        literal = [s for i, s in enumerate(sizes) if isinstance(s, int) and s != -1 and i > 0]
        if before == after and not literal:
            return self._same(node, x)
        flat = after[: layout.axis] == before[: layout.axis] and len(after) == layout.axis + 1
        if flat and not literal:
            return self._flatten(node, x, layout.axis, -1)
        axis = layout.axis
        kept = len(sizes) == len(after) and after[: axis + 1] == before[: axis + 1]
        if self.sizes and kept and not node.kwargs and literal == [before[axis]] and sizes[axis] == before[axis]:
            self.written[node] = axis
            return self._same(node, x)
        return self.opaque(node, f"{describe(node)} reshapes {before} to {after}")

    def _reduce(self, node: fx.Node, x: fx.Node, layout: Layout) -> None:
        ndim = len(_shape(x))
        dim = _arg(node, 1, "dim")
        keep = _arg(node, 2, "keepdim", False)
        dims = range(ndim) if dim is None else [dim] if isinstance(dim, int) else list(dim)
        dims = {d % ndim for d in dims}
        if layout.axis in dims:
            return self.opaque(node, f"{describe(node)} reduces over the channels")
        axis = layout.axis if keep else layout.axis - sum(d < layout.axis for d in dims)
        self.layout[node] = Layout(axis, layout.segments)
        return None

    def _size(self, node: fx.Node, x: fx.Node, layout: Layout) -> None:
        """Code that reads a channel count would not see the sliced width coming: keep them fixed.
        Channels already fixed (the model's input: ``B, C, H, W = x.shape`` in a patch embedding)
        keep their count anyway, and are no stop for the callers that refuse at one."""
        self.layout[node] = None
        if all(self.fixed[self.find(s.group)] for s in layout.segments):
            return
        if node.op == "call_function" and node.args[1] != "shape":
            return
        dim = _arg(node, 1, "dim") if node.op == "call_method" else None
        if dim is not None:
            if dim % len(_shape(x)) == layout.axis:
                self.stop(layout, f"{describe(node)} reads the channel count")
            return
        for user in node.users:
            index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
            if not isinstance(index, int) or index % len(_shape(x)) == layout.axis:
                self.stop(layout, f"{describe(node)} reads the channel count")

    def _index(self, node: fx.Node, x: fx.Node, layout: Layout) -> None:
        index = node.args[1]
        items = index if isinstance(index, tuple) else (index,)
        ndim = len(_shape(x))
        pos_in = pos_out = 0
        for item in items:
            if item is Ellipsis:
                skip = ndim - sum(i is not None and i is not Ellipsis for i in items)
                if pos_in <= layout.axis < pos_in + skip:
                    self.layout[node] = Layout(layout.axis - pos_in + pos_out, layout.segments)
                    return None
                pos_in, pos_out = pos_in + skip, pos_out + skip
            elif item is None:
                pos_out += 1
            elif isinstance(item, slice) and item == slice(None):
                if pos_in == layout.axis:
                    self.layout[node] = Layout(pos_out, layout.segments)
                    return None
                pos_in, pos_out = pos_in + 1, pos_out + 1
            elif isinstance(item, int | slice) and pos_in != layout.axis:
                pos_in, pos_out = pos_in + 1, pos_out + (0 if isinstance(item, int) else 1)
            else:
                return self.opaque(node, f"{describe(node)} indexes the channels")
        self.layout[node] = Layout(layout.axis - pos_in + pos_out, layout.segments)
        return None

    # --- parameters read outside layers ----------------------------------------------------------
    def _param_op(self, node: fx.Node) -> bool:
        """Follow a parameter through an op that only moves its axes; False for any other op."""
        x = node.args[0] if node.args else None
        if x not in self.param_map or any(a is not x and _shape(a) is not None for a in node.all_input_nodes):
            return False  # (sizes read from other tensors may come in: expand(x.shape[0], -1, -1))
        name, dims = self.param_map[x]
        before, after = _shape(x), _shape(node)
        if before is None or after is None:
            return False
        op, target = node.op, node.target
        sizes = node.args[1:]
        sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], tuple | list) else tuple(sizes)
        same = (
            rules.POINTWISE_FUNCTIONS | rules.PARAMETER_FUNCTIONS,
            rules.POINTWISE_METHODS | rules.SAME_SHAPE_METHODS,
        )
        if rules.matches(op, target, same) and before == after:
            new = dims
        elif op == "call_method" and target in rules.RESHAPE_METHODS | {"unsqueeze", "squeeze"}:
            literal = target in rules.RESHAPE_METHODS and any(s not in (1, -1) for s in sizes)
            new = None if literal else _move_axes(before, dims, after)  # a written size breaks once sliced
        elif op == "call_method" and target == "expand":
            lead = len(after) - len(before)
            if any(before[i - lead] != 1 and s != -1 for i, s in enumerate(sizes) if i >= lead):
                return False  # a size written for an axis the parameter fills breaks once sliced
            new = tuple(
                None if i < lead or before[i - lead] != after[i] else dims[i - lead]
                for i in range(len(after))
            )
        else:
            return False
        if new is None:
            return False
        self.param_map[node] = (name, new)
        self.layout[node] = None
        return True

    def _tie(self, a: fx.Node, k: int, layout: Layout) -> bool:
        """Axis ``k`` of parameter-derived ``a`` holds the channels of ``layout``: record it."""
        name, dims = self.param_map[a]
        if dims[k] is None:
            return False
        key = (name, dims[k])
        prev = self.param_ties.get(key)
        if prev is None:
            owner, _, attr = name.rpartition(".")
            self.param_ties[key] = Layout(dims[k], layout.segments)
            self.add(layout, owner, attr, dims[k], "param")
        elif not self._unite(prev, layout):
            return False
        self._used.add(a)
        return True

    def _unite(self, a: Layout, b: Layout) -> bool:
        """Tie two layouts segment by segment; False when they do not line up."""
        if len(a.segments) != len(b.segments) or any(
            s.repeat != t.repeat or self.size[self.find(s.group)] != self.size[self.find(t.group)]
            for s, t in zip(a.segments, b.segments, strict=True)
        ):
            return False
        for s, t in zip(a.segments, b.segments, strict=True):
            self.union(s.group, t.group)
        return True

    def _param_arg(self, node: fx.Node, index: int, name: str, ndim: int) -> fx.Node | None | bool:
        """Argument ``index``/``name`` of a functional layer: None, a parameter-derived node whose
        axes are the parameter's own (``ndim`` of them), or False."""
        a = _arg(node, index, name)
        if a is None:
            return None
        if a in self.param_map and self.param_map[a][1] == tuple(range(ndim)):
            return a
        return False

    def _functional(self, node: fx.Node, x: fx.Node, layout: Layout) -> None:
        """``F.layer_norm`` / ``F.group_norm`` / ``F.linear`` / ``F.conv2d`` with weights read from
        parameters (a LayerNorm subclass over channels-first maps, timm's Linear), as their layers."""
        target, ndim = node.target, len(_shape(x))
        fn = getattr(target, "__name__", str(target))
        if target in (F.layer_norm, F.group_norm):
            weight, bias = self._param_arg(node, 2, "weight", 1), self._param_arg(node, 3, "bias", 1)
            if weight is False or bias is False:
                return self.opaque(node, f"{describe(node)} takes weights the walk cannot place")
            if target is F.layer_norm:
                shape = _arg(node, 1, "normalized_shape")
                if layout.axis != ndim - 1 or not isinstance(shape, tuple | list) or len(shape) != 1:
                    return self.opaque(node, f"{describe(node)} normalises more than the channels")
            else:
                groups = _arg(node, 1, "num_groups")
                per_group = _shape(x)[1] // groups if isinstance(groups, int) else 0
                seg = layout.segments[0]
                if layout.axis != 1 or len(layout.segments) != 1 or not per_group or per_group % seg.repeat:
                    return self.opaque(node, f"{describe(node)} normalises groups the walk cannot slice")
                if groups > 1:  # whole groups are kept; one group (PoolFormer's GroupNorm1) narrows as it is
                    root = self.find(seg.group)
                    self.step[root] = math.lcm(self.step[root], per_group // seg.repeat)
            for p in (weight, bias):
                if p is not None and not self._tie(p, 0, layout):
                    return self.opaque(node, f"{describe(node)} combines differently laid-out channels")
            self.layout[node] = layout
            return None
        axis = ndim - 1 if target is F.linear else 1
        weight = self._param_arg(node, 1, "weight", 2 if target is F.linear else ndim)
        bias = self._param_arg(node, 2, "bias", 1)
        if target is F.conv2d and _arg(node, 6, "groups", 1) != 1:
            return self.opaque(node, f"{describe(node)} is a grouped convolution read from parameters")
        if not weight or bias is False or layout.axis != axis:
            return self.opaque(node, f"{describe(node)} takes weights the walk cannot place")
        owner = self.param_map[weight][0].rpartition(".")[0]
        self._tie_role(weight, 1, layout, "consumer")
        self.fresh(node, _shape(node)[axis], axis, producer=owner or fn)
        out = self.layout[node]
        self._tie_role(weight, 0, out, "producer")
        if bias is not None:
            self._tie_role(bias, 0, out, "producer")
        return None

    def _tie_role(self, a: fx.Node, dim: int, layout: Layout, role: str) -> None:
        """A functional layer's weight: its axis ``dim`` holds ``layout``'s channels in ``role``."""
        name = self.param_map[a][0]
        key = (name, dim)
        if key in self.param_ties:  # read twice: one width per read is not what a layer has
            self.param_bad.setdefault(name, f"{describe(a)} read by two layers")
            return
        owner, _, attr = name.rpartition(".")
        self.param_ties[key] = Layout(dim, layout.segments)
        self.add(layout, owner, attr, dim, role)
        self._used.add(a)

    def _shared_modules(self) -> None:
        """A layer called more than once would need one width per call: keep it whole."""
        for name, nodes in self.calls.items():
            if len(nodes) > 1 and any(True for _ in self.gm.get_submodule(name).parameters()):
                for node in nodes:
                    self.stop(self.layout.get(node), f"{name} is called {len(nodes)} times")
                    for a in node.all_input_nodes:
                        self.fix(self.layout.get(a), f"{name} is called {len(nodes)} times")


class Analysis:
    """The channel groups of one traced network and the channel layout of every node.

    ``stops`` lists, in graph order, every place where the walk could not follow the channels
    (the groups around it are fixed): what a caller that must refuse instead names.
    ``parameters`` maps each parameter read outside a layer that holds channels to its dims and
    their layouts (the parameter's own axis, the groups along it); empty unless asked for.
    ``written``: the reshapes that write a channel count (``sizes``), and the axis it is of.
    """

    def __init__(self, gm: fx.GraphModule, parameters: bool = False, sizes: bool = False):
        walk = _Walk(gm, parameters, sizes)
        self.gm = gm
        self._walk = walk
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(walk.stops))
        self.groups: dict[int, ChannelGroup] = {}
        for g in range(len(walk.parent)):
            root = walk.find(g)
            if root in self.groups:
                continue
            fixed = walk.fixed[root] or (None if walk.name[root] else "nothing in the model produces them")
            self.groups[root] = ChannelGroup(
                root, walk.name[root] or f"group{root}", walk.size[root], walk.step[root],
                tuple(dict.fromkeys(walk.members[root])), fixed, walk.residual[root],
            )  # fmt: skip
        # attention layer -> the group of its heads' channels (not on any tensor's axis: inside the layer)
        self.heads: dict[str, int] = {name: walk.find(g) for name, g in walk.heads.items()}
        self.written: dict[fx.Node, int] = dict(walk.written)  # reshape -> the axis whose count it writes
        self.parameters: dict[str, dict[int, Layout]] = {}
        for (name, dim), layout in walk.param_ties.items():
            self.parameters.setdefault(name, {})[dim] = self._final(layout)

    def _final(self, layout: Layout) -> Layout:
        return Layout(
            layout.axis, tuple(Segment(self._walk.find(s.group), s.repeat) for s in layout.segments)
        )

    def layout(self, node: fx.Node) -> Layout | None:
        """``node``'s channel layout, its segments naming groups by their final ids."""
        layout = self._walk.layout.get(node)
        return None if layout is None else self._final(layout)


def analyze(gm: fx.GraphModule, *, parameters: bool = False, sizes: bool = False) -> Analysis:
    """The channel groups of ``gm`` (nodes annotated with ``tensor_meta``; see :func:`trace`).

    ``parameters``: follow parameters read outside layers into the groups they meet
    (``Analysis.parameters``: each such parameter's dims and the channels along them). Off, they
    keep the groups they meet whole, as callers that only cut layers need (pruning).
    ``sizes``: follow reshapes that write the channel count (``Analysis.written``), for callers
    that write the width there (make_supernet's program) or keep it (ordering); off, a pruned
    model would keep the old count, so they keep their channels whole.
    """
    return Analysis(gm, parameters, sizes)
