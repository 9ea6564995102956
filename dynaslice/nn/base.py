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

from collections.abc import Callable, Hashable

import torch
from torch import nn


class SlicedModule(nn.Module):
    """Base class of sliced leaves (see module docstring)."""

    _MAX_CACHED_SLICES = 16

    def to_static(self, in_shape: torch.Size, *args, **kwargs) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def inference_slices(self, key: Hashable, make: Callable[[], tuple]) -> tuple:
        """``make()``'s weight slices (and plain values beside them), reused when no gradient is needed.

        Why: a slice ``W[:k, :m]`` is a strided view, and conv/linear kernels copy it to a dense
        tensor on every call -- a few percent of a narrow subnet's latency. When autograd is off
        we keep that dense copy, stamped with the version counter and storage of every parameter
        and buffer of the layer, so any in-place update (optimizer step, EMA, load_state_dict,
        ``.to()``) invalidates it: the result is always exactly ``make()``. The cache is a pure
        memo: it is not part of the state dict, pickles or deep copies.
        """
        tensors = [*self._parameters.values(), *self._buffers.values()]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return make()
        stamp = tuple(
            [t._version for t in tensors if t is not None] + [t.data_ptr() for t in tensors if t is not None]
        )
        cache = self.__dict__.setdefault("_slices", {})
        hit = cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in make())
        if len(cache) >= self._MAX_CACHED_SLICES:
            cache.pop(next(iter(cache)))
        cache[key] = (stamp, value)
        return value

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_slices", None)  # a memo, never state: not pickled, not deep-copied
        return state


def check_width(layer: nn.Module, what: str, value: int, maximum: int) -> None:
    """One clear sentence when a subnet asks a layer for more than it has."""
    if not 0 < value <= maximum:
        raise ValueError(f"{type(layer).__name__}: {what} {value} is outside 1..{maximum}")


def as_parameter(t: torch.Tensor) -> nn.Parameter:
    """A detached copy of a weight slice, as a parameter of its own (no storage shared)."""
    return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format))
