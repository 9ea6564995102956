"""Sliced 2-D convolution: output filters ``[:k]``, input channels ``[:m]``, centre kernel crop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import SlicedModule, as_parameter, check_width


class SlicedConv2d(SlicedModule):
    """A conv whose subnet uses the dense slice ``W[:out, :in]`` (DS-Net), optionally with the
    centre ``k x k`` crop of its kernel (DS-Net++ kernel slicing).

    ``depthwise=True`` makes a depthwise conv: the subnet's width follows its input
    (``W[:in]``, ``groups=in``). Other ``groups`` values stay fixed and slice per group.
    ``padding`` defaults to "same" for the largest kernel; a cropped kernel keeps the output
    size by shrinking the padding accordingly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        depthwise: bool = False,
    ):
        super().__init__()
        if depthwise:
            if in_channels != out_channels:
                raise ValueError("a depthwise conv needs in_channels == out_channels")
            groups = in_channels
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) not divisible by groups {groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        self.groups, self.depthwise = groups, depthwise
        # nn.Conv2d gives us torch's standard initialisation and parameter shapes.
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, groups=groups, bias=bias)
        self.weight = ref.weight
        self.bias = ref.bias

    def extra_repr(self) -> str:
        dw = ", depthwise" if self.depthwise else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}{dw}"
        )

    def _slice(self, in_ch: int, out_channels: int | None, kernel_size: int | None):
        """(weight, bias, padding, groups, out) of the subnet; all slices are views."""
        check_width(self, "input channels", in_ch, self.in_channels)
        if self.depthwise:
            if out_channels is not None and out_channels != in_ch:
                raise ValueError(f"depthwise conv: out_channels {out_channels} != input {in_ch}")
            out, groups = in_ch, in_ch
            w = self.weight[:in_ch]
        else:
            out = self.out_channels if out_channels is None else out_channels
            check_width(self, "out_channels", out, self.out_channels)
            groups = self.groups
            if in_ch % groups or out % groups:
                raise ValueError(
                    f"{type(self).__name__}: widths ({in_ch}, {out}) not divisible by groups {groups}"
                )
            w = self.weight[:out, : in_ch // groups]
        b = None if self.bias is None else self.bias[:out]
        pad = self.padding
        k = self.kernel_size if kernel_size is None else kernel_size
        if k != self.kernel_size:
            if not 0 < k <= self.kernel_size or (self.kernel_size - k) % 2:
                raise ValueError(
                    f"kernel_size {k} cannot be centre-cropped from {self.kernel_size} "
                    "(it must be smaller by an even amount)"
                )
            o = (self.kernel_size - k) // 2
            w = w[:, :, o : o + k, o : o + k]
            pad = self.padding - self.dilation * o
        return w, b, pad, groups, out

    def forward(
        self, x: torch.Tensor, out_channels: int | None = None, kernel_size: int | None = None
    ) -> torch.Tensor:
        in_ch = x.shape[1]
        w, b, pad, groups, _ = self.inference_slices(
            (in_ch, out_channels, kernel_size), lambda: self._slice(in_ch, out_channels, kernel_size)
        )
        return F.conv2d(x, w, b, self.stride, pad, self.dilation, groups)

    def to_static(
        self, in_shape: torch.Size, out_channels: int | None = None, kernel_size: int | None = None
    ) -> nn.Conv2d:
        w, b, pad, groups, out = self._slice(in_shape[1], out_channels, kernel_size)
        conv = nn.Conv2d(
            in_shape[1],
            out,
            w.shape[-1],
            self.stride,
            pad,
            self.dilation,
            groups,
            bias=b is not None,
            device="meta",
        )
        conv.weight = as_parameter(w)
        if b is not None:
            conv.bias = as_parameter(b)
        return conv
