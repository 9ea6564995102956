"""Sliced normalisation layers.

BatchNorm keeps its affine ``gamma/beta`` shared and sliced ``[:k]``, but its running statistics
are *private per width*: the mean/variance seen by the first 32 channels of a 32-wide subnet are
not those of the first 32 channels of the 64-wide one, and sharing them is what breaks naive
slimmable nets (Slimmable Networks, Yu et al. 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import SlicedModule, as_parameter, check_width


class SlicedBatchNorm2d(SlicedModule):
    """BatchNorm2d over the first ``k`` channels, with one set of running stats per width.

    ``widths`` lists every channel count a subnet may give this layer (its grid). Row ``i`` of
    ``running_mean``/``running_var``/``num_batches_tracked`` belongs to ``widths[i]``; in train
    mode only that row is updated. ``momentum=None`` means cumulative averaging, the right
    choice for recalibration (see :func:`dynaslice.train.recalibrate_bn`).
    """

    def __init__(
        self,
        num_features: int,
        widths: Sequence[int] | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ):
        super().__init__()
        widths = tuple(sorted(set(widths))) if widths else (num_features,)
        if widths[-1] > num_features:
            raise ValueError(f"BN widths {widths} exceed num_features {num_features}")
        self.num_features, self.widths, self.eps, self.momentum = num_features, widths, eps, momentum
        self._row = {w: i for i, w in enumerate(widths)}
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        n = len(widths)
        self.register_buffer("running_mean", torch.zeros(n, num_features))
        self.register_buffer("running_var", torch.ones(n, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(n, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, widths={list(self.widths)}, eps={self.eps}, momentum={self.momentum}"

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def row(self, width: int) -> int:
        try:
            return self._row[width]
        except KeyError:
            raise ValueError(
                f"SlicedBatchNorm2d got {width} channels; its allowed widths are {list(self.widths)}"
            ) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[1]
        i = self.row(w)
        slices = lambda: (self.running_mean[i, :w], self.running_var[i, :w], self.weight[:w], self.bias[:w])
        if not self.training:
            mean, var, gamma, beta = self.inference_slices(w, slices)
            return F.batch_norm(x, mean, var, gamma, beta, False, 0.0, self.eps)
        self.num_batches_tracked[i] += 1
        factor = 1.0 / float(self.num_batches_tracked[i]) if self.momentum is None else self.momentum
        # Row views: F.batch_norm updates them in place, i.e. only this width's statistics.
        return F.batch_norm(x, *slices(), True, factor, self.eps)

    def to_static(self, in_shape: torch.Size) -> nn.BatchNorm2d:
        w = in_shape[1]
        i = self.row(w)
        bn = nn.BatchNorm2d(w, eps=self.eps, momentum=self.momentum, device="meta")
        bn.weight, bn.bias = as_parameter(self.weight[:w]), as_parameter(self.bias[:w])
        bn.running_mean = self.running_mean[i, :w].clone()
        bn.running_var = self.running_var[i, :w].clone()
        bn.num_batches_tracked = self.num_batches_tracked[i].clone()
        return bn.train(self.training)


class SlicedLayerNorm(SlicedModule):
    """LayerNorm over the first ``e`` features (the active embedding width), gamma/beta ``[:e]``."""

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = x.shape[-1]
        check_width(self, "features", e, self.num_features)
        return F.layer_norm(x, (e,), self.weight[:e], self.bias[:e], self.eps)

    def to_static(self, in_shape: torch.Size) -> nn.LayerNorm:
        e = in_shape[-1]
        check_width(self, "features", e, self.num_features)
        ln = nn.LayerNorm(e, eps=self.eps, device="meta")
        ln.weight, ln.bias = as_parameter(self.weight[:e]), as_parameter(self.bias[:e])
        return ln
