"""DS-MBNet: the one model DS-Net released (SPEC section 2).

A MobileNetV1 layout of depthwise-separable blocks (dw3x3 -> BN -> Swish -> SE -> pw1x1 -> BN ->
Swish), an SE module in every block, no residuals, dropout 0.2 before the classifier:

=========  ======  ======  ===================================
stage      blocks  stride  channels
=========  ======  ======  ===================================
stem       conv3x3 2       16
s0         1       1       32
s1         2       2       48
s2         2       2       96
s3         6       2       224..640 step 32 (14 options)
s4         2       2       736..1152 step 32 (14 options)
head       global pool, dropout 0.2, FC
=========  ======  ======  ===================================

Only ``s3`` and ``s4`` slice, and they are tied (the same index of their grids): the 14 subnets
of DS-Net's routing space. Each SE block's bottleneck is ``round(0.25 * max input channels)`` of
its block, fixed for every width; as in DS-Net's ``MultiHeadGate`` it uses ReLU inside and a
sigmoid gate. :func:`dsmbnet_teacher` is the wider Stage-I teacher with fixed widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn import SlicedLinear
from ..space import Arch, Dim, SearchSpace
from .base import register_supernet
from .mobilenet import ConvBNAct, DepthwiseSeparable, MobileNetBase, Width, init_weights


class DSMBNet(MobileNetBase):
    """DS-MBNet supernet: fixed stem and stages s0-s2, tied width dimensions ``s3``/``s4``.

    ``widths`` are the fixed channels of s0-s2; ``s3``/``s4`` the (equally long) grids of the two
    sliced stages. Module names follow :class:`~dynaslice.models.mobilenet.DSMobileNetV1`
    (``features.N.conv_dw``, ``features.N.se.conv_reduce``, ``classifier.1``).
    """

    def __init__(
        self,
        stem_width: int = 16,
        widths: Sequence[int] = (32, 48, 96),
        s3: Sequence[int] = tuple(range(224, 641, 32)),
        s4: Sequence[int] = tuple(range(736, 1153, 32)),
        depths: Sequence[int] = (1, 2, 2, 6, 2),
        strides: Sequence[int] = (1, 2, 2, 2, 2),
        stem_stride: int = 2,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.2,
        se_ratio: float = 0.25,
        input_size: int | None = None,
    ):
        super().__init__()
        if len(widths) != 3 or len(depths) != 5 or len(strides) != 5:
            raise ValueError("DS-MBNet has three fixed stages (widths) and five stages (depths, strides)")
        s3, s4 = tuple(sorted(set(s3))), tuple(sorted(set(s4)))
        if len(s3) != len(s4):
            raise ValueError(f"s3 and s4 are tied and need equally many widths, got {len(s3)} and {len(s4)}")
        side = input_size or (32 if stem_stride == 1 else 224)
        self.input_size, self.num_classes, self.n_stages = (in_chans, side, side), num_classes, 5
        self.space = SearchSpace((Dim("s3", s3), Dim("s4", s4)), tied=(("s3", "s4"),))
        grid: dict[Width, tuple[int, ...]] = {"s3": s3, "s4": s4}
        stage_widths: list[Width] = [*widths, "s3", "s4"]
        width_max = {**{w: w for w in (stem_width, *widths)}, "s3": s3[-1], "s4": s4[-1]}

        act = nn.SiLU
        self._stem = stem_width
        features: list[nn.Module] = [
            ConvBNAct(in_chans, stem_width, 3, stem_stride, (stem_width,), act_layer=act)
        ]
        self._plan = []
        prev: Width = stem_width
        for w, n, stride in zip(stage_widths, depths, strides, strict=True):
            plan = []
            for j in range(n):
                cin, cout = width_max[prev], width_max[w]
                blk = DepthwiseSeparable(
                    cin,
                    cout,
                    stride if j == 0 else 1,
                    grid.get(prev, (cin,)),
                    grid.get(w, (cout,)),
                    act_layer=act,
                    se_reduced=round(se_ratio * cin),
                )
                plan.append((len(features), (prev, w)))
                features.append(blk)
                prev = w
            self._plan.append(plan)
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), SlicedLinear(s4[-1], num_classes))
        init_weights(self)

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self._pool_classify(x)

    def default_gate_cut(self) -> int:
        """Before the first sliced stage (s3). The paper places the gate in s3's first block; a cut
        inside a stage is not part of the Supernet contract, so we take the boundary before it."""
        for i in range(self.n_stages):
            if any(len(self.space[d].choices) > 1 for d in self.stage_dims(i)):
                return i
        raise ValueError(f"{type(self).__name__} has no sliced stage to put a gate before")


@register_supernet
def dsmbnet(**kwargs) -> DSMBNet:
    """DS-MBNet as released by DS-Net: 14 tied subnets of s3/s4."""
    return DSMBNet(**kwargs)


@register_supernet
def dsmbnet_teacher(**kwargs) -> DSMBNet:
    """The wider Stage-I teacher of DS-MBNet (stem 24, 88, 168, 264, 640, 1152), one subnet."""
    return DSMBNet(24, (88, 168, 264), (640,), (1152,), **kwargs)


@register_supernet
def dsmbnet_small(**kwargs) -> DSMBNet:
    """DS-MBNet for 28-32 px at half width: stride-1 stem and s1, 28x28 ends at 4x4.

    s3 = 112..320 and s4 = 368..576 in steps of 16 (14 tied options, multiples of 8).
    """
    kwargs.setdefault("num_classes", 10)
    return DSMBNet(
        8,
        (16, 24, 48),
        tuple(range(112, 321, 16)),
        tuple(range(368, 577, 16)),
        strides=(1, 1, 2, 2, 2),
        stem_stride=1,
        **kwargs,
    )
