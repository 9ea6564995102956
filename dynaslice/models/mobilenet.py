"""DS-MobileNetV1 and DS-MobileNetV2: MobileNets with every stage's width sliced.

**MobileNetV1** (Howard et al. 2017): a stem conv and 13 depthwise-separable blocks, grouped into
stages of equal width as in the paper's table: ``stem`` 32 | ``s0`` 64 | ``s1`` 128 x2 |
``s2`` 256 x2 | ``s3`` 512 x6 | ``s4`` 1024 x2. One width dimension per stage; each block's
depthwise conv runs at its input width, its pointwise conv outputs the stage width. There is no
torchvision MobileNetV1, so modules are named like torchvision's MobileNetV2 (``features.N``,
``classifier.1``) with timm's block names (``conv_dw``, ``bn1``, ``conv_pw``, ``bn2``).

**MobileNetV2** (Sandler et al. 2018): torchvision's layout and module names exactly, so the
largest subnet of ``mobilenet_v2()`` *is* torchvision's ``mobilenet_v2`` and
:func:`dynaslice.load_pretrained` maps its state dict one to one. Dimensions, per bottleneck
setting ``i`` = (t, c, n, s):

- ``stem``: the stem conv's width (grid of 32);
- ``s{i}.out``: the stage's output width, the residual stream of its blocks (grid of c);
- ``s{i}.exp``: the hidden width of the stage's blocks after the first (grid of ``t * c``).
  The *first* block's hidden width is ``t x`` its input width, exactly as torchvision computes
  it (``hidden = inp * t``), so it follows the previous stage's ``out`` (the ``stem`` for
  stage 0). A separate dimension could not be shared with the later blocks: their maximum is
  ``t * c``, the first block's ``t * c_prev``. Stages whose blocks have no expansion
  (``t == 1``) or that have a single block get no ``exp`` dimension;
- ``s{i}.k`` (DS-Net++ kernel slicing, only when ``kernel_sizes`` has several values): the
  depthwise kernel of the stage's blocks, a centre crop of the stored ``max(kernel_sizes)``
  kernel. With the default ``kernel_sizes=(3,)`` kernels are fixed at 3x3 (torchvision's).

The last 1x1 conv (1280) is fixed, as in torchvision (``max(1.0, width_mult)``) and in the
Slimmable-Networks reference models whose MACs we check against. Residual connections are
structural (rule 4): the non-first blocks of a stage, whose input and output are both
``s{i}.out``. A first block never has one, which matches torchvision for its standard settings
(its first blocks change the width or the stride).

Widths use DS-Net's ratios 0.35:0.05:1.0 rounded to multiples of ``divisor`` (8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import SlicedBatchNorm2d, SlicedConv2d, SlicedLinear, SlicedSqueezeExcite
from ..space import Arch, Dim, SearchSpace, dsnet_ratios, width_grid
from .base import Supernet, register_supernet

# How a block finds one of its widths in the Arch: a dimension name, a fixed channel count, or
# ``(name, factor)`` for ``factor * arch[name]`` (MobileNetV2's first-block hidden width).
Width = str | int | tuple[str, int]


def resolve(arch: Arch, w: Width) -> int:
    """The value of a block width spec for ``arch`` (see :data:`Width`)."""
    if isinstance(w, int):
        return w
    if isinstance(w, str):
        return arch[w]
    name, factor = w
    return factor * arch[name]


def spec_dims(specs: Sequence[Width]) -> tuple[str, ...]:
    """The dimension names the specs read, in order, without repeats."""
    names = [s if isinstance(s, str) else s[0] for s in specs if not isinstance(s, int)]
    return tuple(dict.fromkeys(names))


def init_weights(net: nn.Module) -> None:
    """torchvision's MobileNet initialisation, applied to sliced and plain layers alike."""
    for m in net.modules():
        if isinstance(m, SlicedConv2d | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, SlicedLinear | nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvBNAct(nn.Sequential):
    """Conv -> BN -> activation, children ``0``/``1``/``2`` like torchvision's Conv2dNormActivation.

    ``widths`` is the grid of the output width (the BN keeps one set of statistics per entry).
    A depthwise conv's width is its input's; the caller still passes it (and it is checked).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int = 1,
        widths: Sequence[int] | None = None,
        depthwise: bool = False,
        act_layer: type[nn.Module] = nn.ReLU6,
    ):
        super().__init__(
            SlicedConv2d(cin, cout, kernel_size, stride=stride, depthwise=depthwise),
            SlicedBatchNorm2d(cout, widths),
            act_layer(inplace=True),
        )

    def forward(self, x: torch.Tensor, width: int, kernel_size: int | None = None) -> torch.Tensor:  # type: ignore[override]
        return self[2](self[1](self[0](x, width, kernel_size)))


class DepthwiseSeparable(nn.Module):
    """dw conv -> BN -> act -> (SE) -> pw 1x1 -> BN -> act (MobileNetV1; DS-MBNet with SE).

    ``in_widths``/``out_widths`` are the grids of the input and output widths; ``se_reduced``
    (when given) adds a squeeze-and-excitation with that fixed bottleneck width.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        in_widths: Sequence[int],
        out_widths: Sequence[int],
        kernel_size: int = 3,
        act_layer: type[nn.Module] = nn.ReLU,
        se_reduced: int | None = None,
    ):
        super().__init__()
        self.conv_dw = SlicedConv2d(cin, cin, kernel_size, stride=stride, depthwise=True)
        self.bn1 = SlicedBatchNorm2d(cin, in_widths)
        self.act1 = act_layer(inplace=True)
        self.se = SlicedSqueezeExcite(cin, se_reduced) if se_reduced else None
        self.conv_pw = SlicedConv2d(cin, cout, 1)
        self.bn2 = SlicedBatchNorm2d(cout, out_widths)
        self.act2 = act_layer(inplace=True)

    def forward(self, x: torch.Tensor, in_width: int, out_width: int) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_dw(x, in_width)))
        if self.se is not None:
            x = self.se(x, in_width)
        return self.act2(self.bn2(self.conv_pw(x, out_width)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block, with torchvision's child names (``conv.0`` ... ``conv.3``).

    ``expand=False`` (expansion ratio 1) drops the 1x1 expansion: the depthwise conv then runs
    at the input width, which the caller passes as ``hidden``. ``residual`` is structural.
    """

    def __init__(
        self,
        cin: int,
        hidden: int,
        cout: int,
        stride: int,
        kernel_size: int,
        hidden_widths: Sequence[int],
        out_widths: Sequence[int],
        expand: bool,
        residual: bool,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        if expand:
            layers.append(ConvBNAct(cin, hidden, 1, widths=hidden_widths))
        layers += [
            ConvBNAct(hidden, hidden, kernel_size, stride, hidden_widths, depthwise=True),
            SlicedConv2d(hidden, cout, 1),
            SlicedBatchNorm2d(cout, out_widths),
        ]
        self.conv = nn.Sequential(*layers)
        self.expand, self.use_res_connect = expand, residual

    def forward(self, x: torch.Tensor, hidden: int, out: int, kernel_size: int) -> torch.Tensor:
        y = self.conv[0](x, hidden) if self.expand else x
        dw, project, bn = self.conv[-3], self.conv[-2], self.conv[-1]
        y = bn(project(dw(y, hidden, kernel_size), out))
        return x + y if self.use_res_connect else y


class MobileNetBase(Supernet):
    """Shared plumbing: ``features`` (stem, blocks, optional last conv), a per-stage plan of
    ``(feature index, width specs)`` and a pooled classifier."""

    features: nn.Sequential
    classifier: nn.Sequential
    _plan: list[list[tuple[int, tuple[Width, ...]]]]
    _stem: Width

    def stage_dims(self, i: int) -> tuple[str, ...]:
        if i == -1:
            return spec_dims([self._stem])
        if i >= self.n_stages:
            return ()
        return spec_dims([s for _, specs in self._plan[i] for s in specs])

    def forward_stem(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self.features[0](x, resolve(arch, self._stem))

    def forward_stage(self, i: int, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        for idx, specs in self._plan[i]:
            x = self.features[idx](x, *(resolve(arch, s) for s in specs))
        return x

    def _pool_classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# (channels, blocks, stride of the first block) per stage
MBV1_STAGES: tuple[tuple[int, int, int], ...] = (
    (64, 1, 1),
    (128, 2, 2),
    (256, 2, 2),
    (512, 6, 2),
    (1024, 2, 2),
)


class DSMobileNetV1(MobileNetBase):
    """MobileNetV1 supernet, one width dimension per stage (``stem``, ``s0`` ... ``s4``).

    ``small_input=True`` makes the stem stride 1 (for 28-32 px inputs).
    """

    def __init__(
        self,
        stages: Sequence[tuple[int, int, int]] = MBV1_STAGES,
        stem_width: int = 32,
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        ratios: Sequence[float] | None = None,
        divisor: int = 8,
        drop_rate: float = 0.0,
        input_size: int | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        ratios = dsnet_ratios() if ratios is None else tuple(ratios)
        side = input_size or (32 if small_input else 224)
        self.input_size, self.num_classes, self.n_stages = (in_chans, side, side), num_classes, len(stages)
        grid = {"stem": width_grid(stem_width, ratios, divisor)}
        for i, (c, _, _) in enumerate(stages):
            grid[f"s{i}"] = width_grid(c, ratios, divisor)
        self.space = SearchSpace(tuple(Dim(name, g) for name, g in grid.items()))

        self._stem = "stem"
        features: list[nn.Module] = [
            ConvBNAct(in_chans, stem_width, 3, 1 if small_input else 2, grid["stem"], act_layer=act_layer)
        ]
        self._plan = []
        cin, prev = stem_width, "stem"
        for i, (c, n, stride) in enumerate(stages):
            name, plan = f"s{i}", []
            for j in range(n):
                blk = DepthwiseSeparable(
                    cin, c, stride if j == 0 else 1, grid[prev], grid[name], act_layer=act_layer
                )
                plan.append((len(features), (prev, name)))
                features.append(blk)
                cin, prev = c, name
            self._plan.append(plan)
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), SlicedLinear(cin, num_classes))
        init_weights(self)

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self._pool_classify(x)


# torchvision's inverted residual settings: expansion t, channels c, blocks n, first stride s
MBV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class DSMobileNetV2(MobileNetBase):
    """MobileNetV2 supernet with torchvision's module names (see the module docstring).

    ``kernel_sizes=(3, 5, 7)`` adds DS-Net++'s per-stage kernel dimension ``s{i}.k`` and
    stores 7x7 depthwise kernels (then torchvision weights no longer load).
    ``small_input=True`` makes the stem stride 1.
    """

    def __init__(
        self,
        settings: Sequence[tuple[int, int, int, int]] = MBV2_SETTINGS,
        stem_width: int = 32,
        last_channel: int = 1280,
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        kernel_sizes: Sequence[int] = (3,),
        ratios: Sequence[float] | None = None,
        divisor: int = 8,
        drop_rate: float = 0.2,
        input_size: int | None = None,
    ):
        super().__init__()
        ratios = dsnet_ratios() if ratios is None else tuple(ratios)
        kernel_sizes = tuple(sorted(set(kernel_sizes)))
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd (centre crops), got {kernel_sizes}")
        if any(int(t) != t or t < 1 for t, _, _, _ in settings):
            raise ValueError("expansion ratios t must be positive integers")
        side = input_size or (32 if small_input else 224)
        self.input_size, self.num_classes, self.n_stages = (in_chans, side, side), num_classes, len(settings)
        self.last_channel = last_channel
        kmax = kernel_sizes[-1]

        grid: dict[str, tuple[int, ...]] = {"stem": width_grid(stem_width, ratios, divisor)}
        dims = [Dim("stem", grid["stem"])]
        features: list[nn.Module] = [
            ConvBNAct(in_chans, stem_width, 3, 1 if small_input else 2, grid["stem"])
        ]
        self._stem, self._plan = "stem", []
        cin, prev = stem_width, "stem"
        for i, (t, c, n, s) in enumerate(settings):
            t, out = int(t), f"s{i}.out"
            exp: Width = f"s{i}.exp" if t != 1 and n > 1 else (out, t)
            k: Width = f"s{i}.k" if len(kernel_sizes) > 1 else kmax
            grid[out] = width_grid(c, ratios, divisor)
            if isinstance(exp, str):
                grid[exp] = width_grid(t * c, ratios, divisor)
                dims.append(Dim(exp, grid[exp]))
            dims.append(Dim(out, grid[out]))
            if isinstance(k, str):
                dims.append(Dim(k, kernel_sizes, "kernel"))
            plan = []
            for j in range(n):
                if j == 0:  # hidden = t * input width, as torchvision; width or stride changes
                    hidden: Width = (prev, t)
                    hidden_grid = tuple(t * v for v in grid[prev])
                else:
                    hidden = exp
                    hidden_grid = grid[exp] if isinstance(exp, str) else tuple(t * v for v in grid[out])
                blk = InvertedResidual(
                    cin,
                    t * cin,
                    c,
                    s if j == 0 else 1,
                    kmax,
                    hidden_grid,
                    grid[out],
                    expand=t != 1,
                    residual=j > 0,
                )
                plan.append((len(features), (hidden, out, k)))
                features.append(blk)
                cin, prev = c, out
            self._plan.append(plan)
        features.append(ConvBNAct(cin, last_channel, 1, widths=(last_channel,)))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(last_channel, num_classes))
        self.space = SearchSpace(tuple(dims))
        init_weights(self)

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self._pool_classify(self.features[-1](x, self.last_channel))


@register_supernet
def mobilenet_v1(**kwargs) -> DSMobileNetV1:
    """DS-MobileNetV1 (569 MMACs at 224 px for the largest subnet, 150 M at uniform 0.5)."""
    return DSMobileNetV1(**kwargs)


@register_supernet
def mobilenet_v1_small(**kwargs) -> DSMobileNetV1:
    """DS-MobileNetV1 at half width for 28-32 px: stride-1 stem, 28x28 ends at 4x4."""
    kwargs.setdefault("small_input", True)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("divisor", 4)
    stages = ((32, 1, 1), (64, 2, 1), (128, 2, 2), (256, 6, 2), (512, 2, 2))
    return DSMobileNetV1(stages, stem_width=16, **kwargs)


@register_supernet
def mobilenet_v2(**kwargs) -> DSMobileNetV2:
    """DS-MobileNetV2; its largest subnet is torchvision's ``mobilenet_v2`` (``kernel_sizes=(3,)``)."""
    return DSMobileNetV2(**kwargs)


@register_supernet
def mobilenet_v2_small(**kwargs) -> DSMobileNetV2:
    """DS-MobileNetV2 at half width for 28-32 px: stride-1 stem, stage 1 at stride 1, 640 last."""
    kwargs.setdefault("small_input", True)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("divisor", 4)
    kwargs.setdefault("stem_width", 16)
    kwargs.setdefault("last_channel", 640)
    settings = (
        (1, 8, 1, 1),
        (6, 12, 2, 1),
        (6, 16, 3, 2),
        (6, 32, 4, 2),
        (6, 48, 3, 1),
        (6, 80, 3, 2),
        (6, 160, 1, 1),
    )
    return DSMobileNetV2(settings, **kwargs)
