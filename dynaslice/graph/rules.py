"""How channels flow through each operation: the one pass-through table, as data.

The channel-group walk (:mod:`dynaslice.graph.groups`) looks every ``torch.fx`` node up here.
Keeping the table in one place is the point: before it, channel ordering and pruning each had
their own table, and they disagreed (one knew Hardsigmoid and ``mul``, the other LeakyReLU, Tanh,
GELU and reshapes). An operation missing from every table is *opaque*: the walk keeps the
channels around it at full width and says which operation stopped it, so adding a row here is
how a new network becomes sliceable.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import SlicedBatchNorm2d, SlicedConv2d, SlicedLayerNorm, SlicedLinear
from ..nn.converted import (
    AttentionSpec,
    ConvertedAttention,
    ConvertedConv,
    ConvertedLinear,
    ConvertedNorm,
    slice_parameter,
)

# Elementwise on each value: the channel layout is unchanged, on whichever axis it lies.
POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
POINTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh,
    F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clamp, torch.clip, torch.neg,
    torch.abs, torch.exp, torch.sqrt, torch.square, operator.neg,
}  # fmt: skip
POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "clamp",
    "clamp_", "clip", "neg", "abs", "exp", "sqrt", "square", "detach",
}  # fmt: skip

# Work on the spatial axes only (2, 3, ...): the channel axis must be axis 1.
SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d,
)  # fmt: skip
SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample,
}  # fmt: skip

# Elementwise between tensors (broadcasting): the channels of the operands are tied.
JOIN_FUNCTIONS = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub,
    operator.truediv, operator.itruediv, torch.add, torch.mul, torch.sub, torch.div,
}  # fmt: skip
JOIN_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
ADDITIVE = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
            "add", "add_", "sub", "sub_"}  # fmt: skip

# Methods that keep values and shape (or read metadata): the layout passes when the shape does.
SAME_SHAPE_METHODS = {"dim", "ndimension", "type_as", "to", "float", "double", "half"}

CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
# Layers written as functions on weights read from parameters (a LayerNorm subclass that
# permutes to channels-last, timm's Linear): the walk treats them as their layers.
FUNCTIONAL_LAYERS = {F.layer_norm, F.group_norm, F.linear, F.conv2d}
# Functions that keep a parameter's shape and axes (a converted network's width slice of one,
# met when its supernet is traced again: at the largest width it is the parameter itself).
PARAMETER_FUNCTIONS = {slice_parameter}
FLATTEN = ({torch.flatten}, {"flatten"})
RESHAPE_METHODS = {"view", "reshape"}
PERMUTE = ({torch.permute}, {"permute"})
TRANSPOSE = ({torch.transpose}, {"transpose"})
REDUCE = ({torch.mean, torch.sum, torch.amax, torch.amin}, {"mean", "sum", "amax", "amin"})
SOFTMAX = ({F.softmax, torch.softmax, F.log_softmax}, {"softmax", "log_softmax"})

# Layers with weights over the channels (the walk knows what each does with them): torch's,
# the zoo's sliced leaves and the converted models' leaves alike, so one walk serves plain
# models (pruning), supernets (ordering) and converted supernets.
CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, SlicedConv2d, ConvertedConv)
LINEARS: tuple[type[nn.Module], ...] = (nn.Linear, SlicedLinear, ConvertedLinear)
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LAYER_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, SlicedLayerNorm)
GROUP_NORMS: tuple[type[nn.Module], ...] = (nn.GroupNorm,)


def norm_kind(m: nn.Module) -> str | None:
    """``batch``, ``layer``, ``group`` or None: which normalisation ``m`` is."""
    if isinstance(m, BATCH_NORMS + (SlicedBatchNorm2d,)):
        return "batch"
    if isinstance(m, LAYER_NORMS):
        return "layer"
    if isinstance(m, GROUP_NORMS):
        return "group"
    return m.kind if isinstance(m, ConvertedNorm) else None


def norm_attrs(m: nn.Module) -> list[tuple[str, int]]:
    """The per-channel tensors of a norm layer and the axis of their channels (the zoo's
    BatchNorm keeps one row of statistics per width: its channels are on axis 1)."""
    stats = 1 if isinstance(m, SlicedBatchNorm2d) else 0
    if norm_kind(m) == "batch":
        return [("weight", 0), ("bias", 0), ("running_mean", stats), ("running_var", stats)]
    return [("weight", 0), ("bias", 0)]


def channels_per_group(m: nn.Module) -> int:
    """Channels per group of a GroupNorm (or a converted one)."""
    return m.per_group if isinstance(m, ConvertedNorm) else m.num_channels // m.num_groups


# Library layers outside torch.nn that act per value (kept as one call: their code branches on
# ``self.training``), named by class so that importing dynaslice does not import torchvision.
POINTWISE_LIBRARY_MODULES = {"torchvision.ops.stochastic_depth.StochasticDepth"}


# A BatchNorm subclass with its own forward that applies these parts, in this order, after the
# norm (timm's BatchNormAct2d: batch norm, then ``drop``, then ``act``). Kept as one call (its
# forward branches on ``self.training``) whose channels pass through like a BatchNorm's.
NORM_ACT_PARTS = ("drop", "act")


def norm_act_parts(m: nn.Module) -> tuple[str, ...] | None:
    """The parts a norm+activation layer applies after its BatchNorm (:data:`NORM_ACT_PARTS`
    that it has), or None when ``m`` is no such layer: a BatchNorm subclass whose own forward
    replaces BatchNorm's and which has an ``act`` submodule. Whether they are pointwise is
    :func:`norm_act_refusal`'s question."""
    if not isinstance(m, BATCH_NORMS) or type(m).forward is nn.BatchNorm2d.forward:
        return None
    if not isinstance(getattr(m, "act", None), nn.Module):
        return None
    return tuple(name for name in NORM_ACT_PARTS if isinstance(getattr(m, name, None), nn.Module))


def norm_act_refusal(m: nn.Module) -> str | None:
    """Why the norm+activation layer ``m`` cannot be sliced as a BatchNorm followed by pointwise
    parts (None when it can): another submodule, or a part that is not a pointwise layer."""
    parts = norm_act_parts(m) or ()
    others = [name for name, _ in m.named_children() if name not in parts]
    if others:
        return f"it has submodules {others} besides {list(parts)}"
    odd = [
        f"{name} ({type(getattr(m, name)).__name__})"
        for name in parts
        if not is_pointwise_module(getattr(m, name))
    ]
    if odd:
        return f"its {', '.join(odd)} is not a pointwise torch.nn activation or Identity"
    return None


def class_name(m: nn.Module) -> str:
    """``module.QualifiedName`` of ``m``'s class (how :data:`POINTWISE_LIBRARY_MODULES` names them)."""
    return f"{type(m).__module__}.{type(m).__qualname__}"


def is_pointwise_module(m: nn.Module) -> bool:
    return isinstance(m, POINTWISE_MODULES) or class_name(m) in POINTWISE_LIBRARY_MODULES


def matches(node_op: str, target: object, table: tuple[set, set]) -> bool:
    """Whether a ``call_function`` / ``call_method`` node is in ``(functions, methods)``."""
    functions, methods = table
    return (node_op == "call_function" and target in functions) or (
        node_op == "call_method" and target in methods
    )


# Self-attention layers sliced by whole heads (one node each: the walk knows their weights'
# layout, :class:`~dynaslice.nn.converted.AttentionSpec`). Library layers are named by class, as
# above; their code is not traced, so each name here is a promise that its forward is
# ``AttentionSpec``'s computation: timm's ViT ``Attention`` (fused qkv Linear, then ``proj``).
ATTENTION_LIBRARY_MODULES = {"timm.layers.attention.Attention"}


def attention_spec(m: nn.Module) -> AttentionSpec | None:
    """The head layout of a self-attention layer the walk can slice by heads, or None.

    torch's ``nn.MultiheadAttention`` with one fused input projection and no extra key/value
    biases or zero attention; timm's ``Attention`` (:data:`ATTENTION_LIBRARY_MODULES`) without a
    norm before ``proj`` or an output gate (they would need the heads' channels in other layers),
    with ``q_norm`` / ``k_norm`` over the head size only; a converted one. Others stay whole (an
    ``nn.MultiheadAttention``) or are traced through (timm's variants).
    """
    if isinstance(m, ConvertedAttention):
        return m.spec
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            return None
        return AttentionSpec(
            "", "in_proj_weight", "in_proj_bias", "out_proj", m.num_heads, m.head_dim, "dropout",
            batch_first=m.batch_first, tuple_out=True,
        )  # fmt: skip
    if class_name(m) not in ATTENTION_LIBRARY_MODULES:
        return None
    per_head = all(
        isinstance(n, nn.Identity) or tuple(getattr(n, "normalized_shape", ())) == (m.head_dim,)
        for n in (m.q_norm, m.k_norm)
    )
    if not (isinstance(m.norm, nn.Identity) and getattr(m, "gate", None) is None and per_head):
        return None
    if not (isinstance(m.qkv, nn.Linear) and isinstance(m.proj, nn.Linear)):
        return None
    return AttentionSpec(
        "qkv", "weight", "bias", "proj", m.num_heads, m.head_dim, "attn_drop", ("q_norm", "k_norm"), ("proj_drop",),
    )  # fmt: skip


def attention_refusal(m: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Why a call of the attention layer ``m`` (:func:`attention_spec`) cannot be sliced by heads,
    or None: attention over another tensor (keys or values not the queries), a mask or causal
    attention (not carried by the converted layer yet)."""
    if isinstance(m, ConvertedAttention):
        return None
    try:
        bound = inspect.signature(m.forward).bind(*args, **kwargs)
    except TypeError as e:
        return f"its call does not match its forward ({e})"
    values = bound.arguments
    first = next(iter(values.values()))
    for name in ("key", "value"):
        if name in values and values[name] is not first:
            return "its keys or values are not its queries (cross-attention)"
    for name in ("attn_mask", "key_padding_mask"):
        if values.get(name) is not None:
            return f"it takes {name}"
    if values.get("is_causal", False):
        return "it is causal"
    return None
