"""The zoo's ``resnet_small`` in the Bi-Real / ReCU binary form, and the same network in full precision.

Shape (as :func:`dynaslice.models.resnet.resnet_small`): a 3x3 stride-1 stem, four stages of two
basic blocks, widths 16/32/64/128 times ``width_mult``, stride 2 at the first block of stages 2-4.

What makes it a *binary* network that trains (Bi-Real, ReCU's ResNet):

- the stem convolution and the classifier stay in full precision, with a BatchNorm1d before the
  Linear (the pooled features of a binary network have a poorly scaled range);
- every binary convolution has its own shortcut: ``act(bn(conv(x)) + shortcut(x))``, so the
  real-valued stream survives each 1-bit layer instead of being quantised twice per block;
- the activation is hardtanh (ReCU, Bi-Real) or PReLU (SiMaN), never ReLU: the next layer takes
  the sign of it, and the sign of a post-ReLU tensor is all ``+1``;
- a downsampling shortcut is ``AvgPool2d(2, ceil_mode=True)`` followed by zero channels (ReCU's ResNet-20
  "option A" with an average instead of a strided pick). It has no parameters and no
  multiplications, so every convolution after the stem is 1-bit; a full-precision 1x1
  projection (Bi-Real's choice) would put three float convolutions into a network whose point
  is to have none, for a difference in accuracy the papers measure as small.

``conv=None`` builds the same graph with ``nn.Conv2d``: the full-precision arm of the experiments,
which differs from the binary arms only in the convolution class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BinaryConv2d

ConvFactory = Callable[..., nn.Conv2d]
ACTIVATIONS = ("hardtanh", "prelu")
BASE_WIDTHS = (16, 32, 64, 128)


def _activation(act: str, channels: int) -> nn.Module:
    if act == "hardtanh":
        return nn.Hardtanh()
    if act == "prelu":
        return nn.PReLU(channels)
    raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")


def _conv_factory(conv: type[BinaryConv2d] | None) -> ConvFactory:
    if conv is None:
        return lambda cin, cout, k, stride=1, padding=0: nn.Conv2d(cin, cout, k, stride, padding, bias=False)
    if not (isinstance(conv, type) and issubclass(conv, BinaryConv2d)):
        raise ValueError(f"conv must be a BinaryConv2d subclass or None, got {conv!r}")
    return conv


class PoolPadShortcut(nn.Module):
    """``AvgPool2d(stride)`` then ``cout - cin`` zero channels: the parameter-free downsampling shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout < cin:
            raise ValueError(f"a shortcut cannot narrow {cin} channels to {cout}")
        self.cin, self.cout, self.stride = cin, cout, stride
        # ceil_mode: a 3x3 stride-2 conv with padding 1 maps 7 rows to 4, and so must the shortcut
        # (the last window averages the rows it has)
        self.pool = nn.AvgPool2d(stride, ceil_mode=True) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(self.pool(x), (0, 0, 0, 0, 0, self.cout - self.cin))


class BinaryBasicBlock(nn.Module):
    """Two 3x3 convolutions, each ``act(bn(conv(x)) + shortcut(x))``; ``conv1`` may downsample."""

    def __init__(self, make_conv: ConvFactory, cin: int, cout: int, stride: int, act: str):
        super().__init__()
        self.conv1 = make_conv(cin, cout, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.shortcut1: nn.Module = (
            PoolPadShortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()
        )
        self.act1 = _activation(act, cout)
        self.conv2 = make_conv(cout, cout, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = _activation(act, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)) + self.shortcut1(x))
        return self.act2(self.bn2(self.conv2(y)) + y)


class BinaryResNet(nn.Module):
    """Stem (FP conv, BN, act), ``layer1..layer4`` of :class:`BinaryBasicBlock`, pool, BN1d, FP Linear."""

    def __init__(
        self,
        conv: type[BinaryConv2d] | None,
        *,
        width_mult: float = 1.0,
        act: str = "hardtanh",
        in_chans: int = 1,
        num_classes: int = 10,
        blocks_per_stage: int = 2,
    ):
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        _activation(act, 1)  # refuse an unknown activation before building anything
        make_conv = _conv_factory(conv)
        widths = [max(1, round(w * width_mult)) for w in BASE_WIDTHS]
        self.act_name, self.widths = act, tuple(widths)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = _activation(act, widths[0])
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks = [
                BinaryBasicBlock(make_conv, cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1, act)
                for j in range(blocks_per_stage)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn_fc = nn.BatchNorm1d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for stage in self.stages():
            x = stage(x)
        return self.fc(self.bn_fc(torch.flatten(self.pool(x), 1)))


def binary_resnet_small(
    conv: type[BinaryConv2d] | None,
    *,
    width_mult: float = 1.0,
    act: str = "hardtanh",
    in_chans: int = 1,
    num_classes: int = 10,
) -> BinaryResNet:
    """The small ResNet with every convolution after the stem of class ``conv`` (``None``: full precision)."""
    return BinaryResNet(conv, width_mult=width_mult, act=act, in_chans=in_chans, num_classes=num_classes)
