"""Static subnet extraction: one Arch of a supernet as a plain PyTorch model.

``extract_subnet(net, arch)`` traces ``net(x, arch)`` with ``torch.fx``, treating every sliced
layer as a leaf, and replaces each leaf by the ``torch.nn`` module its ``to_static`` returns
(``nn.Conv2d`` with the sliced weight copied, ``nn.BatchNorm2d`` with that width's running
statistics, ...). The result is a ``torch.fx.GraphModule`` made only of torch (and torchvision)
modules: it runs without dynaslice, can be fine-tuned, scripted, ``torch.export``-ed or sent to
ONNX, and its submodules keep the supernet's names (``layer1.0.conv1``), so state dicts read
naturally.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .atomic import atomic_path
from .graph import Tracer
from .models.base import Supernet
from .models.converted import ConvertedSupernet
from .nn import SlicedModule
from .nn.converted import slice_parameter


class _Tracer(Tracer):
    """The channel-group engine's tracer: sliced layers, torch's own layers and per-value library
    layers (torchvision's StochasticDepth) stay single call_module nodes, so an extracted subnet
    keeps their train/eval behaviour instead of the mode they were traced in."""


class _Bound(nn.Module):
    """``net`` with one Arch baked in: ``forward(x) = net(x, arch)``."""

    def __init__(self, net: nn.Module, arch: Mapping[str, int]):
        super().__init__()
        self.net, self.arch = net, arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.arch)


def trace_subnet(net: nn.Module, arch: Mapping[str, int], input_size: Sequence[int], batch: int = 1) -> fx.GraphModule:
    """``net(x, arch)`` traced with the sliced layers as leaves, every node annotated with its
    output shape (one shape-propagation pass on zeros of ``(batch, *input_size)``, in eval mode so
    BatchNorm statistics stay untouched; each module's mode restored after, as modes may be mixed)."""
    bound = _Bound(net, arch)
    traced = fx.GraphModule(bound, _Tracer().trace(bound))
    param = next(net.parameters())
    example = torch.zeros(batch, *input_size, dtype=param.dtype, device=param.device)
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(example)
    finally:
        for m, training in modes.items():
            m.training = training
    return traced


def extract_subnet(
    net: Supernet, arch: Mapping[str, int], input_size: tuple[int, ...] | None = None
) -> fx.GraphModule:
    """The subnet ``arch`` of ``net`` as a standalone model made of plain ``torch.nn`` modules.

    Its outputs equal ``net(x, arch)`` (same mode, same weights, copied). ``input_size``
    (``(C, H, W)``, default ``net.input_size``) only drives one shape-propagation pass that tells
    each sliced layer its input width.
    """
    arch = net.space.validate(arch)
    input_size = tuple(input_size or net.input_size)
    traced = trace_subnet(net, arch, input_size)
    graph = traced.graph

    modules: dict[str, nn.Module] = {}
    signatures: dict[str, tuple] = {}
    for node in list(graph.nodes):  # a converted network's parameter read outside a layer
        if node.op == "call_function" and node.target is slice_parameter and node.args[0].op == "get_attr":
            _store_slice(node, traced, modules)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in modules:
            continue
        if node.op == "get_attr" and isinstance(net, ConvertedSupernet):  # read at full width: a copy
            name = str(node.target).removeprefix("net.")
            owner, _, attr = str(node.target).rpartition(".")
            modules[name] = copy.deepcopy(getattr(traced.get_submodule(owner), attr))
            node.target = name
            continue
        if node.op == "get_attr":
            raise RuntimeError(
                f"{type(net).__name__} reads {node.target!r} outside a leaf module; "
                "wrap parameters in a sliced leaf so the subnet can be extracted"
            )
        if node.op != "call_module":
            continue
        module = traced.get_submodule(node.target)
        name = node.target.removeprefix("net.")  # keep the supernet's own module names
        if isinstance(module, SlicedModule):
            in_shape = node.args[0].meta["tensor_meta"].shape
            signature = (tuple(in_shape[1:]), node.args[1:], tuple(sorted(node.kwargs.items())))
            if name not in modules:
                modules[name] = module.to_static(in_shape, *node.args[1:], **node.kwargs)
                signatures[name] = signature
            elif signatures[name] != signature:
                raise RuntimeError(f"{name!r} is called twice with different widths; cannot extract")
            node.args, node.kwargs = node.args[:1], {}
        elif name not in modules:  # plain torch module (ReLU, pooling, a fixed layer): copy it
            modules[name] = copy.deepcopy(module)
        node.target = name
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is F.linear:
            _as_linear_module(node, modules)
    for node in graph.nodes:  # traced annotations are strings here; TorchScript can't read them
        node.type = None
    graph._tracer_cls = None  # else pickles of the subnet would import dynaslice's tracer
    out = fx.GraphModule(modules, graph, class_name=f"{type(net).__name__}Subnet")
    out.graph.lint()
    for name, module in out.named_modules():  # each static module keeps its source's mode
        source = net.get_submodule(name) if name else net
        module.training = source.training
    return out


def _store_slice(node: fx.Node, traced: fx.GraphModule, store: dict) -> None:
    """Replace ``slice_parameter(parameter, ...)`` by a read of the slice, stored under the
    parameter's own name: the subnet's parameter has the subnet's shape (and trains as one)."""
    read = node.args[0]
    source = traced.get_parameter(str(read.target))
    name = str(read.target).removeprefix("net.")
    with torch.no_grad():
        value = nn.Parameter(slice_parameter(source, *node.args[1:]).clone(), source.requires_grad)
    if name in store and store[name].shape != value.shape:
        raise RuntimeError(f"{name!r} is read at two widths; cannot extract")
    store.setdefault(name, value)
    node.op, node.target, node.args, node.kwargs = "get_attr", name, (), {}
    if not read.users:
        node.graph.erase_node(read)


def _as_linear_module(node: fx.Node, store: dict) -> None:
    """``F.linear(x, owner.weight, owner.bias)`` on parameters read outside a layer (timm's
    ``Linear`` traced through its own forward) becomes a call of an ``nn.Linear`` named ``owner``:
    the extracted subnet is then made of layers, which pruning and channel ordering cut and
    torch's tools recognise. Any other functional linear is left as it is."""
    args = dict(zip(("input", "weight", "bias"), node.args, strict=False)) | node.kwargs
    weight, bias = args.get("weight"), args.get("bias")
    reads = [n for n in (weight, bias) if n is not None]
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" and len(n.users) == 1 for n in reads):
        return
    owner, _, attr = str(weight.target).rpartition(".")
    held = {k for k in store if k.startswith(f"{owner}.")}
    if not owner or owner in store or attr != "weight" or held != {str(n.target) for n in reads}:
        return
    if bias is not None and str(bias.target) != f"{owner}.bias":
        return
    layer = nn.Linear(store[str(weight.target)].shape[1], store[str(weight.target)].shape[0], bias=bias is not None)
    layer.weight = store.pop(str(weight.target))
    if bias is not None:
        layer.bias = store.pop(str(bias.target))
    store[owner] = layer
    node.op, node.target, node.args, node.kwargs = "call_module", owner, (args["input"],), {}
    for n in reads:
        node.graph.erase_node(n)


def save_torch_model(module: nn.Module, path: str | os.PathLike) -> None:
    """``torch.save`` of a whole plain-torch model (an extracted subnet), written atomically.

    Load it without dynaslice: ``torch.load(path, weights_only=False)`` (only torch is imported;
    the file is a pickle, so load only files you trust -- dynaslice itself never loads one).
    """
    with atomic_path(path) as tmp:
        torch.save(module, tmp)
