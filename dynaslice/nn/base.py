"""What every sliced leaf layer promises.

A *sliced leaf* owns the largest weight of one layer and runs any contiguous prefix of it:

- ``forward(x, *widths)``: the output width (and e.g. a kernel size) is an argument; the input
  width is read from ``x``. Nothing is remembered between calls.
- ``to_static(in_shape, *widths)``: the plain ``torch.nn`` module (``nn.Conv2d``, ``nn.Linear``,
  ``nn.BatchNorm2d``, ...) that computes exactly the same function, with copied weights. This is
  what :func:`dynaslice.extract_subnet` puts in the exported model, and what parameter counting
  uses.

Model code follows two rules so that subnets can be traced and exported with ``torch.fx``:
every parameter lives in a leaf (plain torch module or sliced leaf), and only leaves read widths
from tensor shapes; composite modules take their widths from the Arch.
"""

from __future__ import annotations

import torch
from torch import nn


class SlicedModule(nn.Module):
    """Marker base class of sliced leaves (see module docstring)."""

    def to_static(self, in_shape: torch.Size, *args, **kwargs) -> nn.Module:  # pragma: no cover
        raise NotImplementedError


def check_width(layer: nn.Module, what: str, value: int, maximum: int) -> None:
    """One clear sentence when a subnet asks a layer for more than it has."""
    if not 0 < value <= maximum:
        raise ValueError(f"{type(layer).__name__}: {what} {value} is outside 1..{maximum}")


def as_parameter(t: torch.Tensor) -> nn.Parameter:
    """A detached copy of a weight slice, as a parameter of its own (no storage shared)."""
    return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format))
