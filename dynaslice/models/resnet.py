"""DS-ResNet: ResNet with every stage's width sliced.

Module names follow torchvision's ``resnet.py`` so that the largest subnet of ``resnet18`` /
``resnet50`` *is* torchvision's model and :func:`load_pretrained` maps its weights one to one.

Search space (``ratios`` defaults to DS-Net's 0.35:0.05:1.0, widths rounded to ``divisor``):

- basic blocks: one width per stage ``s1..s4`` (conv outputs and residual stream; the stem
  outputs ``s1`` so that layer1 keeps torchvision's identity shortcut);
- bottlenecks: ``stem`` plus ``s{i}.mid`` (the 1x1/3x3 width) and ``s{i}.out`` (the residual
  stream) per stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn import SlicedBatchNorm2d, SlicedConv2d, SlicedLinear
from ..space import Arch, Dim, SearchSpace, dsnet_ratios, width_grid
from .base import Supernet, register_supernet


class Downsample(nn.Module):
    """1x1 strided projection of the shortcut; children named ``0``/``1`` like torchvision's."""

    def __init__(self, cin: int, cout: int, stride: int, out_grid: Sequence[int]):
        super().__init__()
        self.add_module("0", SlicedConv2d(cin, cout, 1, stride=stride, padding=0))
        self.add_module("1", SlicedBatchNorm2d(cout, out_grid))

    def forward(self, x: torch.Tensor, out: int) -> torch.Tensor:
        return self[1](self[0](x, out))  # type: ignore[index]

    def __getitem__(self, i: int) -> nn.Module:
        return self._modules[str(i)]  # type: ignore[return-value]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, grid: Sequence[int], downsample: bool):
        super().__init__()
        self.conv1 = SlicedConv2d(cin, width, 3, stride=stride)
        self.bn1 = SlicedBatchNorm2d(width, grid)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = SlicedConv2d(width, width, 3)
        self.bn2 = SlicedBatchNorm2d(width, grid)
        self.downsample = Downsample(cin, width, stride, grid) if downsample else None

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x, width)))
        out = self.bn2(self.conv2(out, width))
        identity = x if self.downsample is None else self.downsample(x, width)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        cin: int,
        mid: int,
        out: int,
        stride: int,
        mid_grid: Sequence[int],
        out_grid: Sequence[int],
        downsample: bool,
    ):
        super().__init__()
        self.conv1 = SlicedConv2d(cin, mid, 1, padding=0)
        self.bn1 = SlicedBatchNorm2d(mid, mid_grid)
        self.conv2 = SlicedConv2d(mid, mid, 3, stride=stride)
        self.bn2 = SlicedBatchNorm2d(mid, mid_grid)
        self.conv3 = SlicedConv2d(mid, out, 1, padding=0)
        self.bn3 = SlicedBatchNorm2d(out, out_grid)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = Downsample(cin, out, stride, out_grid) if downsample else None

    def forward(self, x: torch.Tensor, mid: int, out: int) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x, mid)))
        y = self.relu(self.bn2(self.conv2(y, mid)))
        y = self.bn3(self.conv3(y, out))
        identity = x if self.downsample is None else self.downsample(x, out)
        return self.relu(y + identity)


class DSResNet(Supernet):
    """ResNet supernet. ``small_input=True`` uses a 3x3 stride-1 stem and no max-pool (28-32 px)."""

    def __init__(
        self,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        ratios: Sequence[float] | None = None,
        divisor: int = 8,
        drop_rate: float = 0.0,
        input_size: int | None = None,
    ):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if len(layers) != len(widths):
            raise ValueError("layers and widths must have one entry per stage")
        ratios = dsnet_ratios() if ratios is None else tuple(ratios)
        self.block_type, self.num_classes = block, num_classes
        side = input_size or (32 if small_input else 224)
        self.input_size = (in_chans, side, side)
        n_stages = len(layers)
        grid = lambda c: width_grid(c, ratios, divisor)  # noqa: E731
        dims: list[Dim] = []
        expansion = 1 if block == "basic" else 4
        if block == "basic":
            stem_width = widths[0]  # the stem feeds layer1's identity shortcut
            for i, w in enumerate(widths):
                dims.append(Dim(f"s{i + 1}", grid(w)))
        else:
            dims.append(Dim("stem", grid(stem_width)))
            for i, w in enumerate(widths):
                dims += [Dim(f"s{i + 1}.mid", grid(w)), Dim(f"s{i + 1}.out", grid(w * expansion))]
        self.space = SearchSpace(tuple(dims))
        self._stem_dim = "s1" if block == "basic" else "stem"

        stem_grid = self.space[self._stem_dim].choices
        if small_input:
            self.conv1 = SlicedConv2d(in_chans, stem_width, 3, stride=1)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = SlicedConv2d(in_chans, stem_width, 7, stride=2, padding=3)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = SlicedBatchNorm2d(stem_width, stem_grid)
        self.relu = nn.ReLU(inplace=True)

        cin = stem_width
        self._stage_dims: list[tuple[str, ...]] = []
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            if block == "basic":
                names = (f"s{i + 1}",)
                g = self.space[names[0]].choices
                for j in range(n):
                    s = stride if j == 0 else 1
                    blocks.append(BasicBlock(cin, w, s, g, downsample=j == 0 and (s != 1 or cin != w)))
                    cin = w
            else:
                names = (f"s{i + 1}.mid", f"s{i + 1}.out")
                gm, go = self.space[names[0]].choices, self.space[names[1]].choices
                out = w * expansion
                for j in range(n):
                    s = stride if j == 0 else 1
                    blocks.append(Bottleneck(cin, w, out, s, gm, go, downsample=j == 0))
                    cin = out
            self._stage_dims.append(names)
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.n_stages = n_stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = SlicedLinear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's ResNet initialisation
        for m in self.modules():
            if isinstance(m, SlicedConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.n_stages)]

    def stage_dims(self, i: int) -> tuple[str, ...]:
        if i == -1:
            return (self._stem_dim,)
        return self._stage_dims[i] if i < self.n_stages else ()

    def forward_stem(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x, arch[self._stem_dim]))))

    def forward_stage(self, i: int, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        widths = [arch[n] for n in self._stage_dims[i]]
        for blk in self.stages()[i]:
            x = blk(x, *widths)
        return x

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


@register_supernet
def resnet18(**kwargs) -> DSResNet:
    """DS-ResNet-18; its largest subnet is torchvision's ``resnet18``."""
    return DSResNet("basic", (2, 2, 2, 2), (64, 128, 256, 512), **kwargs)


@register_supernet
def resnet50(**kwargs) -> DSResNet:
    """DS-ResNet-50; its largest subnet is torchvision's ``resnet50``."""
    return DSResNet("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), **kwargs)


@register_supernet
def resnet_small(**kwargs) -> DSResNet:
    """A small-input DS-ResNet (about 27 MMACs at 28x28) for Fashion-MNIST/CIFAR and tests."""
    kwargs.setdefault("small_input", True)
    kwargs.setdefault("divisor", 4)
    kwargs.setdefault("num_classes", 10)
    return DSResNet("basic", (2, 2, 2, 2), (16, 32, 64, 128), **kwargs)
