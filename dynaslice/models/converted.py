"""Your own model as a supernet: ``make_supernet(model, example_input)``.

Any network ``torch.fx`` can trace (torchvision's CNNs, hand-written ones) becomes a
:class:`Supernet` whose dimensions are its *channel groups* (:mod:`dynaslice.graph`): channels
tied through residual adds, concatenations, depthwise and grouped convs, squeeze-and-excitation
gates and norms move as one width. The input channels and the output classes stay fixed, and
so does every group the analysis cannot prove safe to slice (it says which, and why).

How a subnet runs. The traced graph is kept, with one change: each layer that touches a sliced
group is replaced by a *sliced leaf* that takes its widths as arguments, and the graph gets a
second input, the Arch. Python code generated from that graph (as ``torch.fx`` does for a
``GraphModule``) then reads ``arch[group]`` and passes it on::

    conv1 = self.layer1[0].conv1(x, arch["layer1.0.conv1"], (arch["conv1"],))

so ``net(x, arch)`` is ordinary dense PyTorch on weight slices with nothing remembered between
calls. Producers keep their first ``w`` output rows; a consumer keeps the input columns of the
first ``w`` channels of each group it reads (one contiguous range per segment of a
concatenation); a depthwise or grouped conv keeps its first whole conv groups and reads its
width from its input. BatchNorm over one group becomes a :class:`~dynaslice.nn.SlicedBatchNorm2d`
with private statistics per width (as in the zoo), seeded with the model's own statistics.
BatchNorm over a concatenation of several groups (DenseNet) keeps one set of statistics for all
widths, since its widths are combinations of several groups; :func:`dynaslice.train.recalibrate_bn`
does not recompute those yet. A norm+activation layer (timm's ``BatchNormAct2d``: a BatchNorm
subclass whose own forward runs the norm, then ``drop`` and ``act``) is sliced the same way, its
pointwise parts applied after, and a subnet extracts it as the layer's own class; other parts
than pointwise torch.nn layers are refused in one line.

The largest subnet *is* the original model: :func:`make_supernet` checks it on the example
input (and that the narrowest subnet runs) before returning.

Channels can be ordered by importance with :func:`dynaslice.ordering.reorder_channels` (except
across concatenations and grouped convs, refused in one line); attention heads as whole heads.

A parameter read outside a layer (ConvNeXt's layer scale, ViT's class token and position
embedding, the weights of a LayerNorm subclass or timm's ``Linear`` whose own forward calls
``F.layer_norm`` / ``F.linear``) stays where the model keeps it, under its own name; where the
analysis ties its axis to a sliced group the program reads ``slice_parameter(p, ...)`` (the
channels the arch keeps), and a subnet extracts the slice as its own parameter. Sizes written
in ``F.layer_norm`` / ``F.group_norm`` calls follow the width, and so does a channel count
written in a reshape that keeps the channel axis (``x.reshape(n, hidden_dim, h * w)``). A forward's extra inputs with
defaults (timm's ViT) are traced at their defaults.

A DS-Net gate (:class:`~dynaslice.gate.GatedSupernet`) sits at a module's output, named by its
path (``model.gate.cut: layer2``): the program is split there in two stages, the trunk before it
and the routed rest after it (:meth:`ConvertedSupernet.split`). The cut must be a point every
value crosses (not inside a residual block or a branch) with features ``[B, C, H, W]`` or tokens
``[B, N, C]``, before the classifier. Without a path the gate sits at the default cut
(:meth:`ConvertedSupernet.default_gate_path`): among the last cuts at each spatial size, the one
whose trunk costs nearest half of the network's MACs at full width, as the zoo's ResNets place it
(a network of tokens: the token cut nearest a quarter, as the zoo's ViTs).

Attention heads: a self-attention layer the engine knows (torch's ``nn.MultiheadAttention`` over
one input, timm's ViT ``Attention``; :func:`dynaslice.graph.rules.attention_spec`) becomes one
:class:`~dynaslice.nn.converted.ConvertedAttention` leaf, and its heads one width dimension
(``<layer>.heads``, in channels: whole heads of a fixed head size, at least one, on DS-Net's
grid in multiples of ``lcm(round_to, head size)`` channels, so every head count for heads of
64). The channels around it are sliced like a linear layer's (a ViT's hidden size: timm's, and
torchvision's, whose patch embedding writes it in a reshape that then writes the width). A subnet extracts the layer as a small traced torch module
(``nn.MultiheadAttention`` ties its heads' width to its embedding's). Not yet: masks,
cross-attention and read attention weights (those layers stay whole, named), other attention
classes (traced through; a reshape that writes the head size keeps them whole), torch's
``nn.TransformerEncoderLayer`` (one torch layer fx cannot trace into: kept whole). Channel
ordering sorts whole heads by importance.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from ..graph import Analysis, GraphError, Layout, analyze, modes_kept, rules, trace
from ..nn import SlicedBatchNorm2d, SlicedModule
from ..nn.converted import (
    ConvertedAttention,
    ConvertedBatchNormAct,
    ConvertedConv,
    ConvertedLinear,
    ConvertedNorm,
    ConvertedNormAct,
    Segments,
    slice_parameter,
)
from ..space import Arch, Dim, SearchSpace, dsnet_ratios, width_grid
from .base import Supernet


def _sliced_batchnorm(
    bn: nn.BatchNorm2d, widths: Sequence[int], parts: Sequence[str] | None = None
) -> SlicedBatchNorm2d:
    """The zoo's BatchNorm with private statistics per width, every row seeded with ``bn``'s
    (then ``bn``'s pointwise ``parts`` when it is a norm+activation layer)."""
    if parts is None:
        new = SlicedBatchNorm2d(bn.num_features, widths, eps=bn.eps, momentum=bn.momentum)
    else:
        new = ConvertedBatchNormAct(bn, parts, widths)
    with torch.no_grad():
        new.weight.copy_(bn.weight)
        new.bias.copy_(bn.bias)
        new.running_mean.copy_(bn.running_mean.expand_as(new.running_mean))
        new.running_var.copy_(bn.running_var.expand_as(new.running_var))
        new.num_batches_tracked.fill_(int(bn.num_batches_tracked))
    new.weight.requires_grad_(bn.weight.requires_grad)
    new.bias.requires_grad_(bn.bias.requires_grad)
    return new.to(device=bn.weight.device, dtype=bn.weight.dtype).train(bn.training)


class ConvertedSupernet(Supernet):
    """A user's network as a supernet (see the module docstring); build it with :func:`make_supernet`.

    Its submodules keep the model's names (``layer1.0.conv1``), so state dicts read like the
    model's. ``kept`` maps each channel group that keeps its full width to the reason. One
    stage (``forward_stem`` and ``forward_head`` are identities), or two when split at a gate
    cut (``split_at``, a module path; ``outputs`` lists where each module's output sits).
    ``analytic_costs`` is false when a layer reads a concatenation of sliced groups: its MACs
    are then a sum (``out * (w_a + w_b)``), so :func:`~dynaslice.count_macs` counts each arch on
    its extracted subnet instead of by formula (:class:`~dynaslice.counting.ExtractedCosts`).
    """

    n_stages = 1

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        graph: fx.Graph,
        space: SearchSpace,
        kept: Mapping[str, str],
        input_size: tuple[int, ...],
        num_classes: int,
        family: str,
        analytic_costs: bool = True,
        tensors: Mapping[str, torch.Tensor] | None = None,
        outputs: Mapping[str, CutPoint] | None = None,
        split_at: str | None = None,
    ):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        for name, t in (tensors or {}).items():  # the model's own parameters (ViT's class token)
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            else:
                self.register_buffer(name, t)
        self.graph, self.space, self.kept = graph, space, dict(kept)
        self.input_size, self.num_classes, self.family = tuple(input_size), num_classes, family
        self.analytic_costs = analytic_costs
        self.outputs, self.split_at = dict(outputs or {}), split_at
        self.stage_graphs = (graph,) if split_at is None else self._split_graph(split_at)
        self.n_stages = len(self.stage_graphs)

    def extra_repr(self) -> str:
        return f"family={self.family}, sliced groups={len(self.space.dims)}, kept={len(self.kept)}"

    def _program(self, i: int = 0):
        """The Python function generated from stage ``i``'s graph: ``fn(self, x, widths)``.

        A memo (like the code of an ``fx.GraphModule``): regenerated after unpickling, shared by
        deep copies (it reads everything from the ``self`` it is given).
        """
        fns = self.__dict__.setdefault("_fns", {})
        if i not in fns:
            code = self.stage_graphs[i].python_code(root_module="self")
            namespace = dict(code.globals)
            exec(compile(code.src, f"<{self.family} supernet>", "exec"), namespace)  # noqa: S102 - fx's codegen
            fns[i] = namespace["forward"]
        return fns[i]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_fns", None)
        return state

    def forward_stem(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return x

    def forward_stage(self, i: int, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        if not 0 <= i < self.n_stages:
            raise IndexError(f"this converted network has {self.n_stages} stage(s), not stage {i}")
        return self._program(i)(self, x, dict(arch))

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return x

    def stage_dims(self, i: int) -> tuple[str, ...]:
        """The dims stage ``i``'s program reads (``arch[name]``); none for the identity stem and head."""
        if not 0 <= i < self.n_stages:
            return ()
        arch = [n for n in self.stage_graphs[i].nodes if n.op == "placeholder"][1]
        return tuple(dict.fromkeys(u.args[1] for u in arch.users if u.target is operator.getitem))

    # --- gate cuts -------------------------------------------------------------------------
    def split(self, path: str) -> ConvertedSupernet:
        """This network in two stages split at module ``path``'s output: the same modules and
        parameters (like a zoo net wrapped by a gate), the trunk as stage 0, the rest as stage 1.
        A cut that is not a module's output, inside a residual block or a branch, or at or after
        the classifier is refused in one line that lists the cuts there are."""
        tensors = {**self._parameters, **self._buffers}
        net = ConvertedSupernet(
            dict(self.named_children()), self.graph, self.space, self.kept, self.input_size,
            self.num_classes, self.family, self.analytic_costs, tensors, self.outputs, path,
        )  # fmt: skip
        net.training = self.training
        return net

    def gate_split(self, cut: int | str | None) -> tuple[Supernet, int, int | str]:
        """A converted network's gate cut is a module path (``None``: :meth:`default_gate_path`):
        the network split there, stage 1 and the path. A stage number is refused (its one stage
        has no inside boundary) except ``1`` on a network already split."""
        if cut is None:
            cut = self.split_at or self.default_gate_path()
        if isinstance(cut, str):
            return (self if cut == self.split_at else self.split(cut)), 1, cut
        if cut == 1 and self.split_at is not None:
            return self, 1, self.split_at
        raise GraphError(
            f"gate cut {cut}: the gate of a network converted by make_supernet sits at a module's "
            f"output, named by its path: {self._candidate_list()}"
        )

    def default_gate_cut(self) -> int:
        """Stage 1 of a network split at a cut; a network in one stage has none (use
        :meth:`gate_split`, which finds the default path)."""
        if self.split_at is None:
            raise GraphError(
                f"{self.family} converted by make_supernet is one stage: place a gate at a module path "
                f"(GatedSupernet(net, cut=PATH), model.gate.cut: PATH): {self._candidate_list()}"
            )
        return 1

    def default_gate_path(self) -> str:
        """The default gate cut: of each spatial size's last cut (where a stage ends; the last of
        the outermost modules' cuts, not the expansion inside the next stage's first block), the one
        whose trunk costs nearest half of the network's MACs at full width (the zoo's ResNets
        route after their middle stage); in a network of tokens (``[B, N, C]`` features, no
        stages), the token cut nearest a quarter (the zoo's ViTs route after their first quarter
        of blocks). Cuts after which nothing sliced is left to route are skipped; ties go to the
        earlier. A network with no such cut is refused in one line naming the cuts there are."""
        ends: list[tuple[str, CutPoint]] = []
        for path, point in self._candidates():  # per spatial size, the last of the outermost cuts
            if len(point.shape) != 4:
                continue
            if not ends or ends[-1][1].shape[2:] != point.shape[2:]:
                ends.append((path, point))
            elif path.count(".") <= ends[-1][0].count("."):  # not inside the next stage's first block
                ends[-1] = (path, point)
        share = 1 / 2
        if len(ends) < 2:  # no stages: tokens, or feature maps of one size
            ends, share = [(p, point) for p, point in self._candidates() if len(point.shape) == 3], 1 / 4
        splits = {path: self.split(path) for path, _ in ends}
        # a cut after which every width is pinned by the trunk leaves nothing to route
        splits = {p: net for p, net in splits.items() if set(net.stage_dims(1)) - set(net.stage_dims(0))}
        if not splits:
            raise GraphError(
                f"{self.family} has no default gate cut (no stage end or token cut with sliced layers after "
                f"it); set model.gate.cut to a module path: {self._candidate_list()}"
            )
        param = next(self.parameters())
        x = torch.zeros(1, *self.input_size, dtype=param.dtype, device=param.device)
        largest, trunk = self.space.largest(), {}
        with modes_kept(self), torch.no_grad():  # eval mode: BatchNorm statistics stay untouched
            self.eval()
            with FlopCounterMode(display=False) as counter:
                self(x, largest)
            total = counter.get_total_flops()
            for path, net in splits.items():
                with FlopCounterMode(display=False) as counter:
                    net.forward_to(x, largest, 1)
                trunk[path] = counter.get_total_flops()
        return min(trunk, key=lambda p: abs(trunk[p] - share * total))  # dicts keep order: ties go first

    def _candidates(self) -> list[tuple[str, CutPoint]]:
        """Every valid gate cut, in program order, each node once under its outermost path."""
        order = {n.name: i for i, n in enumerate(self.graph.nodes)}
        by_node: dict[str, tuple[str, CutPoint]] = {}
        for path, point in self.outputs.items():
            if _cut_refusal(self.graph, point) is None:
                known = by_node.get(point.node)
                if known is None or path.count(".") < known[0].count("."):
                    by_node[point.node] = (path, point)
        return sorted(by_node.values(), key=lambda item: order[item[1].node])

    def _candidate_list(self, limit: int = 10) -> str:
        paths = [p for p, _ in self._candidates()]
        if not paths:
            return "it has none (no module output that every value crosses before the classifier)"
        more = f", ... ({len(paths)} in all)" if len(paths) > limit else ""
        return f"the cuts there are: {', '.join(paths[:limit])}{more}"

    def _split_graph(self, path: str) -> tuple[fx.Graph, fx.Graph]:
        """The program as two graphs, before and after ``path``'s output (see :meth:`split`)."""
        point = self.outputs.get(path)
        if point is None:
            what = "is not a module of" if path not in dict(self.named_modules()) else "has no tensor output in"
            raise GraphError(f"gate cut {path!r} {what} {self.family}; {self._candidate_list()}")
        why = _cut_refusal(self.graph, point)
        if why is not None:
            raise GraphError(f"gate cut {path!r} {why}; {self._candidate_list()}")
        return _split_program(self.graph, point.node)


class CutPoint(NamedTuple):
    """Where a module's output sits in a converted program: a gate cut candidate."""

    node: str
    """The name of the program node holding it."""
    shape: tuple[int, ...]
    """Its shape on the example input."""
    scores: bool
    """It carries the model's output channels: the classifier's output or after it."""


def _module_outputs(gm: fx.GraphModule, analysis: Analysis, graph: fx.Graph) -> dict[str, CutPoint]:
    """Each module's output in the program ``graph`` made from ``gm``: fx inlines the modules a
    model calls and records where each node was traced (``nn_module_stack``), so a module's output
    is the last node traced inside it."""
    last: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            last[path] = node
    result = analysis.layout(gm.graph.output_node().args[0])
    scores = {s.group for s in result.segments} if result is not None else set()
    program = {n.name: n for n in graph.nodes}
    outputs = {}
    for path, node in last.items():
        twin, shape = program.get(node.name), getattr(node.meta.get("tensor_meta"), "shape", None)
        if twin is None or (twin.op, twin.target) != (node.op, node.target) or shape is None:
            continue  # renamed in the program (a name its width reads took), or no tensor
        layout = analysis.layout(node)
        reads = {s.group for s in layout.segments} if layout is not None else set()
        outputs[path] = CutPoint(node.name, tuple(shape), bool(reads & scores))
    return outputs


def _flows(graph: fx.Graph) -> set[fx.Node]:
    """The nodes computed from the input (the first placeholder); the rest read only the arch
    and parameters, and can be recomputed on either side of a cut."""
    nodes = iter(graph.nodes)
    flows = {next(nodes)}
    for node in nodes:
        if any(a in flows for a in node.all_input_nodes):
            flows.add(node)
    return flows


def _cut_refusal(graph: fx.Graph, point: CutPoint) -> str | None:
    """Why the program cannot be split at ``point`` (one clause), or None."""
    if len(point.shape) not in (3, 4):
        if point.scores or len(point.shape) == 2:
            return f"is the classifier or after it (its output has shape {list(point.shape)})"
        return f"has shape {list(point.shape)}; the gate reads features [B, C, H, W] or tokens [B, N, C]"
    if point.scores:
        return f"carries the class scores (shape {list(point.shape)}): the classifier or after it"
    nodes = list(graph.nodes)
    flows = _flows(graph)
    cut = next(n for n in nodes if n.name == point.node)
    if cut not in flows:
        return "is not computed from the input"
    pos = nodes.index(cut)
    before = set(nodes[: pos + 1])
    for node in nodes[:pos]:
        if node in flows:
            later = [u for u in node.users if u not in before]
            if later:
                return (
                    f"is inside a residual block or a branch: {node.name}, computed before it, is still used "
                    f"after it (by {later[0].name}); cut at a block's output"
                )
    return None


def _split_program(graph: fx.Graph, at: str) -> tuple[fx.Graph, fx.Graph]:
    """``graph`` (inputs ``x, arch``) as two graphs: ``x, arch -> node at`` and ``h, arch -> output``.

    Nodes computed from the input run on their side of the cut only (:func:`_cut_refusal` has
    checked that none but the cut crosses it); those reading only the arch or the parameters
    (width reads, sliced parameters) are copied to each side that uses them."""
    nodes = list(graph.nodes)
    flows = _flows(graph)
    x, arch = nodes[:2]
    cut = next(n for n in nodes if n.name == at)
    pos = nodes.index(cut)

    def part(inputs: Sequence[fx.Node], body: Sequence[fx.Node], result: fx.Node) -> fx.Graph:
        g, env = fx.Graph(), {}
        for node in inputs:
            env[node] = g.placeholder(node.name)
        for node in body:
            env[node] = g.node_copy(node, env.__getitem__)
        g.output(env[result])
        for node in reversed(body):  # the arch and parameter reads only the other side uses
            if node not in flows and not env[node].users:
                g.erase_node(env[node])
        g.lint()
        return g

    before = nodes[2 : pos + 1]
    after = [n for i, n in enumerate(nodes[2:-1], 2) if i > pos or n not in flows]
    return part([x, arch], before, cut), part([cut, arch], after, nodes[-1].args[0])


# --------------------------------------------------------------------------- make_supernet


def _check_options(ratios: Sequence[float] | None, round_to: int) -> tuple[float, ...]:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to <= 0:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    ratios = dsnet_ratios() if ratios is None else tuple(ratios)
    if not ratios:
        raise ValueError("ratios is empty; give width ratios in (0, 1], e.g. [0.5, 0.75, 1.0]")
    bad = [r for r in ratios if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 1]
    if bad:
        raise ValueError(f"width ratios must lie in (0, 1], got {bad}")
    return ratios


def _check_graph(gm: fx.GraphModule, family: str) -> int:
    """Refuse what the converted forward cannot carry; return the number of classes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphError(
            f"{family}.forward takes {len(placeholders)} inputs; make_supernet needs exactly one"
        )
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    result = out.args[0]
    shape = getattr(getattr(result, "meta", {}).get("tensor_meta"), "shape", None)
    if shape is None or len(shape) != 2:
        raise GraphError(
            f"{family} must return one tensor of class scores [batch, classes]; it returns "
            f"{'shape ' + str(tuple(shape)) if shape is not None else type(result).__name__}"
        )
    return int(shape[1])


def _dimensions(
    analysis: Analysis, ratios: Sequence[float], round_to: int
) -> tuple[list[Dim], dict[str, str]]:
    """One width dimension per sliceable group (DS-Net's grid), and the groups kept whole."""
    dims, kept = [], {}
    for group in analysis.groups.values():
        if not group.modules("producer"):
            continue  # the model's input (or channels nothing produces): never a dimension
        if group.fixed is not None:
            kept[group.name] = group.fixed
            continue
        grid = width_grid(group.size, ratios, math.lcm(round_to, group.step))
        if len(grid) == 1:
            kept[group.name] = f"{group.size} channels leave no narrower width at round_to={round_to}"
            continue
        dims.append(Dim(group.name, grid))
    return dims, kept


def _segments(analysis: Analysis, layout: Layout) -> Segments:
    return tuple((analysis.groups[s.group].size, s.repeat) for s in layout.segments)


def _convert_layers(gm: fx.GraphModule, analysis: Analysis, space: SearchSpace) -> dict[fx.Node, str]:
    """Replace, in ``gm``, each layer touching a sliced group by its sliced leaf; return the
    nodes whose calls need widths, and which (``"out+ins"``, ``"ins"``, ``"attention"``: out, ins
    and heads, or ``""``)."""
    sliced = {g.id: g.name for g in analysis.groups.values() if g.name in space.names}
    calls: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(str(node.target))
        before, after = analysis.layout(node.args[0]), analysis.layout(node)
        touched = {s.group for layout in (before, after) if layout for s in layout.segments}
        heads = analysis.heads.get(str(node.target))
        touched |= {heads} if heads is not None else set()
        if not touched & set(sliced) or before is None:
            continue
        segments = _segments(analysis, before)
        parts = rules.norm_act_parts(m)  # timm's BatchNormAct2d: a BatchNorm, then pointwise parts
        if heads is not None:  # self-attention: its heads are a group of their own
            new, calls[node] = ConvertedAttention(m, rules.attention_spec(m), segments), "attention"
        elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            new = ConvertedConv(m, None if m.groups > 1 else segments)
            calls[node] = "" if m.groups > 1 else "out+ins"
        elif isinstance(m, nn.Linear):
            new, calls[node] = ConvertedLinear(m, segments), "out+ins"
        elif (
            isinstance(m, nn.BatchNorm2d) and m.affine and m.track_running_stats and len(segments) == 1
            and segments[0][1] == 1
        ):  # fmt: skip
            choices = space[sliced[before.segments[0].group]].choices
            new, calls[node] = _sliced_batchnorm(m, choices, parts), ""
        elif parts is not None:
            new, calls[node] = ConvertedNormAct(m, parts, segments), "ins"
        elif isinstance(m, rules.BATCH_NORMS + (nn.LayerNorm, nn.GroupNorm)):
            new, calls[node] = ConvertedNorm(m, segments), "ins"
        else:
            continue  # channel-agnostic layers (activations, pooling) run as they are
        new.train(m.training)  # each layer keeps the model's mode (modes may be mixed)
        parent, _, child = str(node.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, child, new)
    return calls


def _program_graph(
    gm: fx.GraphModule, analysis: Analysis, space: SearchSpace, calls: dict[fx.Node, str]
) -> fx.Graph:
    """The traced graph with an ``arch`` input whose widths are passed to the sliced leaves."""
    names = {g.id: g.name for g in analysis.groups.values()}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    widths: dict[str, fx.Node] = {}
    arch = None

    def width(group: int) -> fx.Node | int:
        name = names[group]
        if name not in space.names:
            return analysis.groups[group].size
        if name not in widths:
            widths[name] = graph.call_function(operator.getitem, (arch, name))
        return widths[name]

    def total(layout: Layout) -> fx.Node | int:  # the width of a (concatenated) channel axis
        parts = [width(s.group) if s.repeat == 1 else graph.call_function(operator.mul, (width(s.group), s.repeat))
                 for s in layout.segments]  # fmt: skip
        return functools.reduce(lambda a, b: graph.call_function(operator.add, (a, b)), parts)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            arch = graph.placeholder("arch")
            continue
        dims = analysis.parameters.get(str(node.target), {}) if node.op == "get_attr" else {}
        if any(names[s.group] in space.names for layout in dims.values() for s in layout.segments):
            # a parameter read outside a layer: the channels the arch keeps along each of its dims
            read = graph.node_copy(node, lambda n: env[n])
            order = sorted(dims)
            segments = tuple(_segments(analysis, dims[d]) for d in order)
            kept = tuple(tuple(width(s.group) for s in dims[d].segments) for d in order)
            env[node] = graph.call_function(slice_parameter, (read, tuple(order), segments, kept))
            continue
        if node in analysis.written and _sliced(analysis.layout(node), analysis, space):
            # a reshape that writes the channel count (a patch embedding's): it writes the width
            size = total(analysis.layout(node))
            new = graph.node_copy(node, lambda n: env[n])
            new.args, new.meta = _size_written(new.args, analysis.written[node], size), {}
            env[node] = new
            continue
        resize = _functional_size(node, analysis, space)
        if resize is not None:  # F.layer_norm / F.group_norm: the size written in the call follows the width
            new = graph.node_copy(node, lambda n: env[n])
            index, per_group = resize
            size = total(analysis.layout(node.args[0]))
            value = (
                (size,) if per_group is None else graph.call_function(operator.floordiv, (size, per_group))
            )
            new.args = tuple(value if i == index else a for i, a in enumerate(new.args))
            new.kwargs = {
                k: (value if k in ("normalized_shape", "num_groups") else v) for k, v in new.kwargs.items()
            }
            env[node] = new
            new.meta = {}
            continue
        kind, extra = calls.get(node), ()
        if kind:
            ins = tuple(width(s.group) for s in analysis.layout(node.args[0]).segments)
            extra = (ins,)
        if kind in ("out+ins", "attention"):
            extra = (width(analysis.layout(node).segments[0].group), ins)
        if kind == "attention":
            extra = (*extra, width(analysis.heads[str(node.target)]))
        new = graph.node_copy(node, lambda n: env[n])
        if kind == "attention":  # one input: its keys and values are its queries
            new.args, new.kwargs = new.args[:1], {}
        if extra:
            new.args = (*new.args, *extra)
        env[node] = new
        new.meta = {}  # the shapes served the analysis; torch.save (pickle protocol 2) cannot store them
    graph.lint()
    return graph


def _size_written(args: tuple, position: int, size: fx.Node | int) -> tuple:
    """A reshape's arguments (``x, *sizes`` or ``x, sizes``) with ``size`` at ``position`` of its sizes."""
    if len(args) == 2 and isinstance(args[1], tuple | list):
        return (args[0], tuple(size if i == position else a for i, a in enumerate(args[1])))
    return tuple(size if i == position + 1 else a for i, a in enumerate(args))


def _sliced(layout: Layout | None, analysis: Analysis, space: SearchSpace) -> bool:
    """Whether a channel axis holds a sliced group."""
    return layout is not None and any(analysis.groups[s.group].name in space.names for s in layout.segments)


def _functional_size(node: fx.Node, analysis: Analysis, space: SearchSpace) -> tuple[int, int | None] | None:
    """For ``F.layer_norm`` / ``F.group_norm`` over sliced channels: which argument holds the
    size written in the call (``normalized_shape`` / ``num_groups``) and the channels per group
    (None for a layer norm); else None."""
    if node.op != "call_function" or node.target not in (F.layer_norm, F.group_norm):
        return None
    layout = analysis.layout(node.args[0])
    if layout is None or not any(analysis.groups[s.group].name in space.names for s in layout.segments):
        return None
    if node.target is F.layer_norm:
        return 1, None
    channels = node.args[0].meta["tensor_meta"].shape[1]
    groups = node.args[1] if len(node.args) > 1 else node.kwargs["num_groups"]
    return None if groups == 1 else (1, channels // groups)  # one group stays one group


def _analytic(analysis: Analysis, space: SearchSpace, calls: dict[fx.Node, str]) -> bool:
    """Whether every cost is a monomial in the widths: no layer reads a concatenation of sliced
    groups, no attention layer reads or writes sliced channels (its MACs, counted as one item,
    are the projections' ``tokens * heads * (3 in + out)`` plus ``2 tokens^2 * heads``), and no
    parameter is read outside a layer (the formula counts the parameters of the layers called;
    each arch is then counted on its extracted subnet)."""
    if any(node.op == "get_attr" for node in analysis.gm.graph.nodes):
        return False
    for node, kind in calls.items():
        segments = analysis.layout(node.args[0]).segments
        if len(segments) > 1 and any(analysis.groups[s.group].name in space.names for s in segments):
            return False
        if kind == "attention" and any(
            analysis.groups[s.group].name in space.names for s in segments + analysis.layout(node).segments
        ):
            return False
    return True


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _verify(net: ConvertedSupernet, model: nn.Module, example: torch.Tensor) -> None:
    """The largest subnet must be the model (1e-5 relative), and the narrowest must run."""
    with modes_kept(net), modes_kept(model), torch.no_grad():
        net.eval()
        model.eval()
        want = model(example)
        try:
            got = net(example, net.space.largest())
            net(example, net.space.smallest())
        except Exception as e:  # a case the analysis missed: never hand out a broken network
            raise GraphError(
                f"make_supernet could not convert {net.family}: its subnets fail ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); please report this model"
            ) from e
    err = _relative_error(got, want)
    if not err <= 1e-5:
        raise GraphError(
            f"make_supernet could not convert {net.family}: its largest subnet differs from the model "
            f"(relative error {err:.2g}); please report this model"
        )


def make_supernet(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    ratios: Sequence[float] | None = None,
    round_to: int = 8,
) -> Supernet:
    """Your own ``model`` as a weight-sharing supernet; ``model`` itself is left untouched.

    ``example_input`` (e.g. ``torch.randn(1, 3, 224, 224)``) fixes the input size used for
    tracing, MAC counting and export. Each channel group the analysis can slice safely becomes
    one width dimension of ``net.space``, with DS-Net's grid (``ratios`` of its channels,
    default 0.35:0.05:1.0, rounded to multiples of ``round_to``). Groups it cannot slice keep
    their full width: ``net.kept`` says why, and a warning names them in one line. The largest
    subnet is the model itself (checked). Raises :class:`~dynaslice.graph.GraphError` (a
    ValueError, one line) for models that cannot be traced or converted. A Hugging Face
    transformer is not traced: :func:`dynaslice.lm.make_lm_supernet` slices its known modules.
    """
    from ..lm.supernet import is_transformers_model, make_lm_supernet

    if is_transformers_model(model):
        return make_lm_supernet(model, example_input, ratios=ratios, round_to=round_to)
    ratios = _check_options(ratios, round_to)
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_supernet takes a torch.nn.Module, got {type(model).__name__}")
    family = type(model).__name__
    sliced = [n for n, m in model.named_modules() if isinstance(m, SlicedModule)]
    if sliced:
        raise GraphError(
            f"{family} already holds dynaslice's sliced layers ({sliced[0]}); give a plain torch model"
        )
    original = model
    model = copy.deepcopy(model)
    gm = trace(model, example_input)
    num_classes = _check_graph(gm, family)
    analysis = analyze(gm, parameters=True, sizes=True)
    dims, kept = _dimensions(analysis, ratios, round_to)
    if not dims:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(kept.items())[:3])
        first = f"; the first op it cannot follow: {analysis.stops[0]}" if analysis.stops else ""
        raise GraphError(f"make_supernet found no channels of {family} it can slice ({reasons}{first})")
    space = SearchSpace(tuple(dims))
    calls = _convert_layers(gm, analysis, space)
    graph = _program_graph(gm, analysis, space, calls)
    modules = dict(gm.named_children())
    tensors = {
        n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr" and "." not in n.target
    }
    clash = sorted(
        n
        for n in [*modules, *tensors]
        if hasattr(ConvertedSupernet, n) or n in ("graph", "space", "kept", "family")
    )
    if clash:
        raise GraphError(f"{family} has submodules named {clash}, which ConvertedSupernet uses; rename them")
    net = ConvertedSupernet(
        modules, graph, space, kept, tuple(example_input.shape[1:]), num_classes, family,
        _analytic(analysis, space, calls), tensors, _module_outputs(gm, analysis, graph),
    )  # fmt: skip
    net.training = original.training
    _verify(net, original, example_input)
    surprising = {k: v for k, v in kept.items() if v != "the model's output"}
    if surprising:
        listed = "; ".join(f"{k} ({v})" for k, v in list(surprising.items())[:3])
        more = f" and {len(surprising) - 3} more" if len(surprising) > 3 else ""
        warnings.warn(
            f"make_supernet keeps {len(surprising)} channel group(s) of {family} at full width: {listed}{more} "
            "(net.kept lists them all)",
            stacklevel=2,
        )
    return net
