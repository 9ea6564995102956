"""Sliced building blocks: stateless layers that run a dense, contiguous prefix of their weights."""

from .attention import SlicedAttention
from .base import SlicedModule
from .conv import SlicedConv2d
from .linear import SlicedLinear
from .norm import SlicedBatchNorm2d, SlicedLayerNorm
from .se import SlicedSqueezeExcite

__all__ = [
    "SlicedAttention",
    "SlicedBatchNorm2d",
    "SlicedConv2d",
    "SlicedLayerNorm",
    "SlicedLinear",
    "SlicedModule",
    "SlicedSqueezeExcite",
]
