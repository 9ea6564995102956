"""Squeeze-and-excitation whose channel width is sliced but whose bottleneck is fixed."""

from __future__ import annotations

import torch
from torch import nn

from .conv import SlicedConv2d


class SlicedSqueezeExcite(nn.Module):
    """SE block (Hu et al. 2018) over the first ``width`` channels of a sliced feature map.

    The reduced width ``R`` is fixed (DS-MBNet uses ``round(0.25 * max input channels)``), so a
    subnet uses the reduce conv's ``W[:R, :width]`` and the expand conv's ``W[:width, :R]``:
    every subnet shares one bottleneck, which is what DS-Net's gate trunk relies on. ``width``
    comes from the caller (the Arch), not from the tensor, like every composite module.

    ``act_layer`` is the bottleneck activation (ReLU in DS-Net), ``gate_layer`` the gate
    (sigmoid; ``nn.Hardsigmoid`` for MobileNetV3-style blocks). Both are modules, so an
    extracted subnet keeps them as they are.
    """

    def __init__(
        self,
        channels: int,
        reduced: int | None = None,
        ratio: float = 0.25,
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: type[nn.Module] = nn.Sigmoid,
    ):
        super().__init__()
        reduced = max(1, round(ratio * channels)) if reduced is None else reduced
        if reduced <= 0:
            raise ValueError(f"SE reduced width must be positive, got {reduced}")
        self.channels, self.reduced = channels, reduced
        self.conv_reduce = SlicedConv2d(channels, reduced, 1, padding=0, bias=True)
        self.act = act_layer()
        self.conv_expand = SlicedConv2d(reduced, channels, 1, padding=0, bias=True)
        self.gate = gate_layer()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduced={self.reduced}"

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.act(self.conv_reduce(s, self.reduced))
        s = self.gate(self.conv_expand(s, width))
        return x * s
