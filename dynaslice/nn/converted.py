"""Sliced copies of torch layers, for networks converted by :func:`dynaslice.make_supernet`.

Each wraps the parameters of one ``torch.nn`` layer of the user's model (the same tensors, not
copies) and runs a dense slice of them, taking its widths as arguments like every sliced leaf
(:mod:`dynaslice.nn.base`). Unlike the zoo's layers they read *segmented* inputs: a layer after
a concatenation keeps the first ``w_i`` channels of each concatenated group, one contiguous range
per segment (``in_segments``: the channels and repeat of each segment, see
:mod:`dynaslice.graph.groups`). ``to_static`` gives the plain ``torch.nn`` layer of a subnet.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import SlicedModule, as_parameter
from .norm import SlicedBatchNorm2d

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}

Segments = tuple[tuple[int, int], ...]  # (channels, repeat) of each segment of an input axis


def channel_index(segments: Segments, widths: Sequence[int], device: torch.device) -> int | torch.Tensor:
    """Positions of the first ``widths[i]`` channels of each segment: an int ``n`` when they are
    the leading ``n`` positions (a plain slice), else an index tensor."""
    if len(segments) != len(widths):
        raise ValueError(f"expected {len(segments)} segment widths, got {len(widths)}")
    leading, offset, parts = 0, 0, []
    contiguous = True
    for (size, repeat), w in zip(segments, widths, strict=True):
        parts.append(torch.arange(offset, offset + w * repeat, device=device))
        if contiguous:
            leading += w * repeat
            contiguous = w == size
        offset += size * repeat
    if all(w == s for (s, _), w in zip(segments[:-1], widths[:-1], strict=True)):
        return leading
    return torch.cat(parts)


def take(t: torch.Tensor | None, axis: int, index: int | torch.Tensor) -> torch.Tensor | None:
    """``t`` restricted to ``index`` along ``axis`` (a view for a leading slice)."""
    if t is None:
        return None
    if isinstance(index, int):
        return t.narrow(axis, 0, index)
    return t.index_select(axis, index)


def slice_parameter(
    t: torch.Tensor,
    dims: tuple[int, ...],
    segments: tuple[Segments, ...],
    widths: tuple[tuple[int, ...], ...],
) -> torch.Tensor:
    """A parameter read outside a layer (a layer scale, a class token, a functional layer's
    weight), kept to the channels the arch keeps along each of ``dims``: the first ``widths[i][j]``
    channels of segment ``j`` of ``segments[i]``. A plain function of the parameter, so gradients
    reach it and :func:`dynaslice.extract_subnet` stores the slice as the subnet's parameter
    (a traced call stays one node, through torch's ``__torch_function__`` protocol)."""
    if torch.overrides.has_torch_function((t,)):
        return torch.overrides.handle_torch_function(slice_parameter, (t,), t, dims, segments, widths)
    for dim, segs, ws in zip(dims, segments, widths, strict=True):
        t = take(t, dim, channel_index(segs, ws, t.device))
    return t


def _width(index: int | torch.Tensor) -> int:
    return index if isinstance(index, int) else len(index)


class ConvertedConv(SlicedModule):
    """A torch conv (1-3 d) of a converted model, running a dense slice of its weights.

    ``in_segments=None``: a depthwise or grouped conv; it keeps its first whole conv groups,
    as many as its input holds (no widths passed). Otherwise ``forward(x, out, ins)`` keeps
    output rows ``[:out]`` and the input columns of the first ``ins[i]`` channels of each input
    segment.
    """

    def __init__(self, conv: nn.Module, in_segments: Segments | None):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.in_segments = conv.dilation, in_segments
        self.conv_type = type(conv)  # nn.Conv1d / 2d / 3d: what to_static builds

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, groups={self.groups}"
        )

    def _slice(self, in_ch: int, out: int | None, ins: tuple[int, ...] | None):
        if self.in_segments is None:
            per_in, per_out = self.in_channels // self.groups, self.out_channels // self.groups
            groups = in_ch // per_in
            if groups * per_in != in_ch:
                raise ValueError(f"{in_ch} input channels are not whole groups of {per_in}")
            return self.weight[: groups * per_out], take(self.bias, 0, groups * per_out), groups
        index = channel_index(self.in_segments, ins, self.weight.device)
        if _width(index) != in_ch:
            raise ValueError(f"the arch gives {_width(index)} input channels, the input has {in_ch}")
        return take(self.weight[:out], 1, index), take(self.bias, 0, out), 1

    def forward(
        self, x: torch.Tensor, out: int | None = None, ins: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        in_ch = x.shape[1]
        w, b, groups = self.inference_slices((in_ch, out, ins), lambda: self._slice(in_ch, out, ins))
        conv = _CONV_FUNCTIONS[self.conv_type]  # a lookup, not an attribute: pickles keep no function
        return conv(x, w, b, self.stride, self.padding, self.dilation, groups)

    def to_static(
        self, in_shape: torch.Size, out: int | None = None, ins: tuple[int, ...] | None = None
    ) -> nn.Module:
        w, b, groups = self._slice(in_shape[1], out, ins)
        conv = self.conv_type(
            in_shape[1], w.shape[0], self.kernel_size, self.stride, self.padding, self.dilation, groups,
            bias=b is not None, device="meta",
        )  # fmt: skip
        conv.weight = as_parameter(w)
        if b is not None:
            conv.bias = as_parameter(b)
        return conv


class ConvertedLinear(SlicedModule):
    """A torch linear layer of a converted model: rows ``[:out]``, the columns of the first
    ``ins[i]`` channels of each input segment (a flatten repeats each channel ``H*W`` times)."""

    def __init__(self, linear: nn.Linear, in_segments: Segments):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.in_segments = in_segments

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def _slice(self, in_f: int, out: int, ins: tuple[int, ...]):
        index = channel_index(self.in_segments, ins, self.weight.device)
        if _width(index) != in_f:
            raise ValueError(f"the arch gives {_width(index)} input features, the input has {in_f}")
        return take(self.weight[:out], 1, index), take(self.bias, 0, out)

    def forward(self, x: torch.Tensor, out: int, ins: tuple[int, ...]) -> torch.Tensor:
        in_f = x.shape[-1]
        w, b = self.inference_slices((in_f, out, ins), lambda: self._slice(in_f, out, ins))
        return F.linear(x, w, b)

    def to_static(self, in_shape: torch.Size, out: int, ins: tuple[int, ...]) -> nn.Linear:
        w, b = self._slice(in_shape[-1], out, ins)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        lin.weight = as_parameter(w)
        if b is not None:
            lin.bias = as_parameter(b)
        return lin


class ConvertedNorm(SlicedModule):
    """BatchNorm (any dims; over a concatenation: one set of statistics), LayerNorm (last axis)
    or GroupNorm (whole groups kept) of a converted model, over the channels the arch keeps."""

    def __init__(self, norm: nn.Module, in_segments: Segments):
        super().__init__()
        self.norm_type, self.in_segments, self.eps = type(norm), in_segments, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        if isinstance(norm, _BATCH_NORMS):
            self.kind, self.momentum = "batch", norm.momentum
            self.track = norm.track_running_stats
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, getattr(norm, name))
        elif isinstance(norm, nn.GroupNorm):
            self.kind, self.per_group = "group", norm.num_channels // norm.num_groups
        else:
            self.kind = "layer"

    def _slice(self, index: int | torch.Tensor) -> list:
        names = ["weight", "bias"] + (["running_mean", "running_var"] if self.kind == "batch" else [])
        return [take(getattr(self, n), 0, index) for n in names]

    def forward(self, x: torch.Tensor, ins: tuple[int, ...]) -> torch.Tensor:
        index = channel_index(self.in_segments, ins, x.device)
        if self.kind == "layer":
            w, b = self._slice(index)
            return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)
        if self.kind == "group":
            w, b = self._slice(index)
            return F.group_norm(x, x.shape[1] // self.per_group, w, b, self.eps)
        w, b, mean, var = self._slice(index)
        update, factor = self.training and self.track, 0.0
        if update:  # as nn.BatchNorm does: momentum None means a cumulative average
            self.num_batches_tracked += 1
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        y = F.batch_norm(x, mean, var, w, b, self.training or not self.track, factor, self.eps)
        if update and not isinstance(index, int):  # index_select copied them: write the update back
            with torch.no_grad():
                self.running_mean[index], self.running_var[index] = mean, var
        return y

    def to_static(self, in_shape: torch.Size, ins: tuple[int, ...]) -> nn.Module:
        index = channel_index(self.in_segments, ins, self.weight.device if self.weight is not None else None)
        width = _width(index)
        if self.kind == "layer":
            new = nn.LayerNorm(width, eps=self.eps, elementwise_affine=self.weight is not None, device="meta")
        elif self.kind == "group":
            new = nn.GroupNorm(width // self.per_group, width, eps=self.eps, affine=self.weight is not None,
                               device="meta")  # fmt: skip
        else:
            new = self.norm_type(width, eps=self.eps, momentum=self.momentum, affine=self.weight is not None,
                                 track_running_stats=self.track, device="meta")  # fmt: skip
        for name, t in zip(
            ["weight", "bias", "running_mean", "running_var"], self._slice(index), strict=False
        ):
            if t is None:
                continue
            if name.startswith("running"):
                setattr(new, name, t.detach().clone())
            else:
                setattr(new, name, as_parameter(t))
        if self.kind == "batch" and self.track:
            new.num_batches_tracked = self.num_batches_tracked.detach().clone()
        return new.train(self.training)


class _PartsAfter:
    """A sliced BatchNorm leaf that, like a norm+activation layer (timm's ``BatchNormAct2d``: a
    BatchNorm subclass whose forward runs the norm, then ``drop``, then ``act``), applies
    pointwise parts after the norm. The parts are the layer's own modules, under the same names,
    so state dicts and modes read as the model's; ``to_static`` gives the layer's own class."""

    def _take_parts(self, layer: nn.Module, parts: Sequence[str]) -> None:
        self.parts, self.static_type = tuple(parts), type(layer)
        for name in self.parts:
            self.add_module(name, getattr(layer, name))

    def forward(self, x: torch.Tensor, *widths: tuple[int, ...]) -> torch.Tensor:
        y = super().forward(x, *widths)
        for name in self.parts:
            y = getattr(self, name)(y)
        return y

    def to_static(self, in_shape: torch.Size, *widths: tuple[int, ...]) -> nn.Module:
        """The plain BatchNorm of this width, turned into the layer's own class with copies of its
        parts: what the class's ``__init__`` builds (a BatchNorm, then the parts), without
        calling it (its arguments, e.g. timm's ``act_layer``, are not kept)."""
        new = super().to_static(in_shape, *widths)
        new.__class__ = self.static_type
        for name in self.parts:
            new.add_module(name, copy.deepcopy(getattr(self, name)))
        return new


class ConvertedBatchNormAct(_PartsAfter, SlicedBatchNorm2d):
    """A norm+activation layer over one group: private statistics per width, as the zoo's
    BatchNorm (:class:`~dynaslice.nn.SlicedBatchNorm2d`), then the layer's pointwise parts."""

    def __init__(self, layer: nn.BatchNorm2d, parts: Sequence[str], widths: Sequence[int]):
        super().__init__(layer.num_features, widths, eps=layer.eps, momentum=layer.momentum)
        self._take_parts(layer, parts)


class ConvertedNormAct(_PartsAfter, ConvertedNorm):
    """A norm+activation layer over a concatenation, or without affine parameters or running
    statistics: :class:`ConvertedNorm`'s BatchNorm, then the layer's pointwise parts."""

    def __init__(self, layer: nn.Module, parts: Sequence[str], in_segments: Segments):
        super().__init__(layer, in_segments)
        self.norm_type = next(c for c in type(layer).__mro__ if c in _BATCH_NORMS)  # what to_static builds
        self._take_parts(layer, parts)


# --------------------------------------------------------------------------- attention heads


@dataclass(frozen=True)
class AttentionSpec:
    """Where a self-attention layer keeps its weights, named as the layer names them (so a
    converted layer's state dict reads as the model's), and its head layout.

    ``qkv`` owns the fused q/k/v projection (``""``: the layer itself, as torch's
    ``nn.MultiheadAttention`` keeps ``in_proj_weight``); its rows are q, k and v one after
    another, each ``heads`` heads of ``head_dim`` rows (timm's ``qkv`` Linear has the same
    layout). ``proj`` is the output projection (a Linear). ``norms``: the layers applied to q and
    k per head (timm's ``q_norm``, ``k_norm``); ``dropout``: the dropout layer on the attention
    weights; ``after``: pointwise layers after ``proj`` (timm's ``proj_drop``). ``tuple_out``:
    the layer returns ``(output, weights)`` (``nn.MultiheadAttention``; converted only where the
    weights are not read, so they are ``None``). ``batch_first=False``: tokens come first.
    """

    qkv: str
    qkv_weight: str
    qkv_bias: str
    proj: str
    heads: int
    head_dim: int
    dropout: str
    norms: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    batch_first: bool = True
    tuple_out: bool = False

    @property
    def width(self) -> int:
        """Channels of all heads: the width of each of q, k and v."""
        return self.heads * self.head_dim


def _attend(
    qkv: torch.Tensor, heads: int, head_dim: int, norms: Sequence[nn.Module], drop: nn.Module
) -> torch.Tensor:
    """Attention of ``heads`` heads from the fused projection ``qkv`` (``[B, N, 3*heads*head_dim]``,
    rows q, k, v): ``[B, N, heads*head_dim]``. Written out (softmax, the dropout layer, ``@ v``)
    rather than with ``F.scaled_dot_product_attention``, whose dropout rate is a number: traced
    into an extracted subnet it would keep the mode it was traced in, the layer keeps following it."""
    b, n = qkv.shape[0], qkv.shape[1]
    q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if norms:
        q, k = norms[0](q), norms[1](k)
    weights = drop(((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1))
    return (weights @ v).transpose(1, 2).reshape(b, n, heads * head_dim)


class _AttentionLayout(nn.Module):
    """What the sliced attention leaf and its static subnet layer share: the layer's weights under
    its own names (``spec``) and the computation around :func:`_attend`."""

    spec: AttentionSpec

    def _qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        owner = self.get_submodule(self.spec.qkv)
        return getattr(owner, self.spec.qkv_weight), getattr(owner, self.spec.qkv_bias)

    def _run(self, x: torch.Tensor, w_qkv, b_qkv, w_proj, b_proj, heads: int):  # noqa: ANN001, ANN202
        spec = self.spec
        if not spec.batch_first:
            x = x.transpose(0, 1)
        norms = [self.get_submodule(n) for n in spec.norms]
        y = _attend(F.linear(x, w_qkv, b_qkv), heads, spec.head_dim, norms, self.get_submodule(spec.dropout))
        y = F.linear(y, w_proj, b_proj)
        for name in spec.after:
            y = self.get_submodule(name)(y)
        if not spec.batch_first:
            y = y.transpose(0, 1)
        return (y, None) if spec.tuple_out else y


class _StaticAttention(_AttentionLayout):
    """One subnet's attention layer, traced by :meth:`ConvertedAttention.to_static` into a
    ``torch.fx.GraphModule`` of torch modules and ops (an extracted subnet loads and exports
    without dynaslice)."""

    def __init__(
        self, spec: AttentionSpec, heads: int, parts: dict[str, nn.Module], tensors: dict[str, torch.Tensor]
    ):
        super().__init__()
        self.spec, self.heads = spec, heads  # heads: how many this subnet keeps (a constant when traced)
        for name, part in parts.items():
            self.add_module(name, part)
        for path, t in tensors.items():
            owner, _, attr = path.rpartition(".")
            setattr(self.get_submodule(owner), attr, as_parameter(t))

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - a tensor, or (tensor, None) as the layer returned
        w_qkv, b_qkv = self._qkv()
        proj = self.get_submodule(self.spec.proj)
        return self._run(x, w_qkv, b_qkv, proj.weight, proj.bias, self.heads)


class ConvertedAttention(_AttentionLayout, SlicedModule):
    """A self-attention layer of a converted model (torch's ``nn.MultiheadAttention`` on one
    input, timm's ViT ``Attention``; see :func:`dynaslice.graph.rules.attention_spec`), sliced by
    whole heads.

    ``forward(x, out, ins, heads)``: the first ``heads`` channels of q, k and v (``heads`` is a
    multiple of the head size, which stays fixed: the first ``heads / head_dim`` heads), the
    output projection's rows ``[:out]`` and columns ``[:heads]``, the input columns of the first
    ``ins[i]`` channels of each input segment. The layer's own submodules and parameters are kept
    under their names (``in_proj_weight``, ``out_proj``; ``qkv``, ``q_norm``, ``proj``, ...).
    ``to_static`` gives a ``torch.fx.GraphModule`` of the same submodules with the sliced weights
    (a ``nn.MultiheadAttention`` of fewer heads cannot be built: it ties the heads' width to the
    embedding's).
    """

    def __init__(self, layer: nn.Module, spec: AttentionSpec, in_segments: Segments):
        super().__init__()
        self.spec, self.in_segments = spec, in_segments
        for name, p in layer.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, child in layer.named_children():
            self.add_module(name, child)
        if not hasattr(self, spec.dropout):  # nn.MultiheadAttention keeps its rate as a number
            self.add_module(spec.dropout, nn.Dropout(layer.dropout))

    def extra_repr(self) -> str:
        return f"heads={self.spec.heads}, head_dim={self.spec.head_dim}"

    def _slice(self, in_f: int, out: int, ins: tuple[int, ...], heads: int) -> tuple:
        spec = self.spec
        if heads % spec.head_dim or not 0 < heads <= spec.width:
            raise ValueError(f"{heads} channels are not 1 to {spec.heads} heads of {spec.head_dim}")
        w, b = self._qkv()
        index = channel_index(self.in_segments, ins, w.device)
        if _width(index) != in_f:
            raise ValueError(f"the arch gives {_width(index)} input features, the input has {in_f}")
        rows = channel_index(((spec.width, 1),) * 3, (heads,) * 3, w.device)  # of q, of k, of v
        proj = self.get_submodule(spec.proj)
        return (
            take(take(w, 0, rows), 1, index), take(b, 0, rows),
            proj.weight[:out, :heads], take(proj.bias, 0, out),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, out: int, ins: tuple[int, ...], heads: int):  # noqa: ANN201
        w_qkv, b_qkv, w_proj, b_proj = self._slice(x.shape[-1], out, ins, heads)
        return self._run(x, w_qkv, b_qkv, w_proj, b_proj, heads // self.spec.head_dim)

    def to_static(self, in_shape: torch.Size, out: int, ins: tuple[int, ...], heads: int) -> fx.GraphModule:
        spec = self.spec
        w_qkv, b_qkv, w_proj, b_proj = self._slice(in_shape[-1], out, ins, heads)
        parts = {n: copy.deepcopy(c) for n, c in self.named_children() if n not in (spec.qkv, spec.proj)}
        parts[spec.proj] = nn.Linear(w_proj.shape[1], w_proj.shape[0], bias=b_proj is not None, device="meta")
        tensors = {f"{spec.proj}.weight": w_proj, f"{spec.proj}.bias": b_proj}
        if spec.qkv:
            parts[spec.qkv] = nn.Linear(w_qkv.shape[1], w_qkv.shape[0], bias=b_qkv is not None, device="meta")
        tensors.update({f"{spec.qkv}.{spec.qkv_weight}".lstrip("."): w_qkv,
                        f"{spec.qkv}.{spec.qkv_bias}".lstrip("."): b_qkv})  # fmt: skip
        static = _StaticAttention(
            spec, heads // spec.head_dim, parts, {k: t for k, t in tensors.items() if t is not None}
        )
        if not spec.qkv and b_qkv is None:
            static.register_parameter(spec.qkv_bias, None)
        return fx.symbolic_trace(static).train(self.training)
