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
across concatenations and grouped convs, refused in one line).

A parameter read outside a layer (ConvNeXt's layer scale, ViT's class token and position
embedding, the weights of a LayerNorm subclass or timm's ``Linear`` whose own forward calls
``F.layer_norm`` / ``F.linear``) stays where the model keeps it, under its own name; where the
analysis ties its axis to a sliced group the program reads ``slice_parameter(p, ...)`` (the
channels the arch keeps), and a subnet extracts the slice as its own parameter. Sizes written
in ``F.layer_norm`` / ``F.group_norm`` calls follow the width. A forward's extra inputs with
defaults (timm's ViT) are traced at their defaults.

Not yet (issue 28): gate cuts (a converted net is one stage; ``model.gate.cut`` comes later),
attention heads (``nn.MultiheadAttention`` and reshapes that write the head size keep a
transformer's embedding whole; its MLP widths are sliced).
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph import Analysis, GraphError, Layout, analyze, modes_kept, rules, trace
from ..nn import SlicedBatchNorm2d, SlicedModule
from ..nn.converted import (
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
    stage: ``forward_stem`` and ``forward_head`` are identities until gate cuts come.
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

    def extra_repr(self) -> str:
        return f"family={self.family}, sliced groups={len(self.space.dims)}, kept={len(self.kept)}"

    def _program(self):
        """The Python function generated from :attr:`graph`: ``fn(self, x, widths)``.

        A memo (like the code of an ``fx.GraphModule``): regenerated after unpickling, shared by
        deep copies (it reads everything from the ``self`` it is given).
        """
        fn = self.__dict__.get("_fn")
        if fn is None:
            code = self.graph.python_code(root_module="self")
            namespace = dict(code.globals)
            exec(compile(code.src, f"<{self.family} supernet>", "exec"), namespace)  # noqa: S102 - fx's codegen
            fn = self.__dict__["_fn"] = namespace["forward"]
        return fn

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_fn", None)
        return state

    def forward_stem(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return x

    def forward_stage(self, i: int, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        if i != 0:
            raise IndexError(f"a converted network has one stage, not stage {i}")
        return self._program()(self, x, dict(arch))

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return x

    def stage_dims(self, i: int) -> tuple[str, ...]:
        return self.space.names if i == 0 else ()

    def default_gate_cut(self) -> int:
        raise GraphError(
            f"{self.family} converted by make_supernet has no gate cut yet (one stage): gates on converted "
            "networks are not supported yet; train without model.gate (dynaslice train)"
        )

    def dims_before(self, cut: int) -> tuple[str, ...]:
        """Refused: a gate at the input or after the logits is no DS-Net gate (an explicit
        ``model.gate.cut`` reaches here; the default cut is refused by :meth:`default_gate_cut`)."""
        raise GraphError(
            f"model.gate.cut={cut}: gate cuts on networks converted by make_supernet ({self.family}) "
            "are not supported yet; train without model.gate (dynaslice train)"
        )


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
    nodes whose calls need widths, and which (``"out+ins"``, ``"ins"`` or ``""``)."""
    sliced = {g.id: g.name for g in analysis.groups.values() if g.name in space.names}
    calls: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(str(node.target))
        before, after = analysis.layout(node.args[0]), analysis.layout(node)
        touched = {s.group for layout in (before, after) if layout for s in layout.segments}
        if not touched & set(sliced) or before is None:
            continue
        segments = _segments(analysis, before)
        parts = rules.norm_act_parts(m)  # timm's BatchNormAct2d: a BatchNorm, then pointwise parts
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
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
        if node in calls and calls[node]:
            ins = tuple(width(s.group) for s in analysis.layout(node.args[0]).segments)
            extra = (
                (width(analysis.layout(node).segments[0].group), ins) if calls[node] == "out+ins" else (ins,)
            )
        else:
            extra = ()
        new = graph.node_copy(node, lambda n: env[n])
        if extra:
            new.args = (*new.args, *extra)
        env[node] = new
        new.meta = {}  # the shapes served the analysis; torch.save (pickle protocol 2) cannot store them
    graph.lint()
    return graph


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
    groups, and no parameter is read outside a layer (the formula counts the parameters of the
    layers called; each arch is then counted on its extracted subnet)."""
    if any(node.op == "get_attr" for node in analysis.gm.graph.nodes):
        return False
    for node in calls:
        segments = analysis.layout(node.args[0]).segments
        if len(segments) > 1 and any(analysis.groups[s.group].name in space.names for s in segments):
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
    analysis = analyze(gm, parameters=True)
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
        _analytic(analysis, space, calls), tensors,
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
