"""Sliced linear layer: rows ``[:k]``, columns ``[:m]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import SlicedModule, as_parameter, check_width


class SlicedLinear(SlicedModule):
    """A linear layer whose subnet uses ``W[:out, :in]`` and ``b[:out]``.

    ``chunks > 1`` stores several same-shaped projections stacked along the output (a ViT's
    fused q/k/v, as in timm's ``qkv`` layout): the subnet takes rows ``[:out]`` of *each* chunk,
    so slicing heads keeps q, k and v aligned. ``out`` is then the width of one chunk.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, chunks: int = 1):
        super().__init__()
        self.in_features, self.out_features, self.chunks = in_features, out_features, chunks
        ref = nn.Linear(in_features, out_features * chunks, bias=bias)
        self.weight = ref.weight
        self.bias = ref.bias

    def extra_repr(self) -> str:
        c = f", chunks={self.chunks}" if self.chunks > 1 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{c}"

    def _slice(self, in_f: int, out_features: int | None):
        check_width(self, "input features", in_f, self.in_features)
        out = self.out_features if out_features is None else out_features
        check_width(self, "out_features", out, self.out_features)
        if self.chunks == 1:
            w = self.weight[:out, :in_f]
            b = None if self.bias is None else self.bias[:out]
        else:
            c, full = self.chunks, self.out_features
            w = self.weight.view(c, full, -1)[:, :out, :in_f].reshape(c * out, in_f)
            b = None if self.bias is None else self.bias.view(c, full)[:, :out].reshape(c * out)
        return w, b

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        w, b = self.inference_slices(
            (x.shape[-1], out_features), lambda: self._slice(x.shape[-1], out_features)
        )
        return F.linear(x, w, b)

    def to_static(self, in_shape: torch.Size, out_features: int | None = None) -> nn.Linear:
        w, b = self._slice(in_shape[-1], out_features)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        lin.weight = as_parameter(w)
        if b is not None:
            lin.bias = as_parameter(b)
        return lin
