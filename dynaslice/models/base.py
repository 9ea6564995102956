"""The supernet contract, the model registry, and pretrained-weight import."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..space import Arch, SearchSpace


class Supernet(nn.Module):
    """A weight-sharing network whose ``forward(x, arch)`` runs the subnet named by ``arch``.

    Subclasses set ``space`` (their :class:`SearchSpace`) and ``input_size`` (the default
    ``(C, H, W)`` used for MAC counting and export), and start ``forward`` with
    ``arch = self.space.validate(arch)`` so that a bad Arch fails with a clear message.
    """

    space: SearchSpace
    input_size: tuple[int, int, int]
    num_classes: int

    def forward(self, x: torch.Tensor, arch: Mapping[str, int]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """A clear error for the most common mistake: the wrong number of input channels."""
        if x.dim() != 4 or x.shape[1] != self.input_size[0]:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, {self.input_size[0]}, H, W), "
                f"got {tuple(x.shape)}"
            )


_REGISTRY: dict[str, Callable[..., Supernet]] = {}


def register_supernet(fn: Callable[..., Supernet]) -> Callable[..., Supernet]:
    """Register a builder under its function name (timm-style)."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"supernet {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_supernets(pattern: str = "*") -> list[str]:
    """Registered supernet names matching a shell-style ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_supernet(name: str, **kwargs) -> Supernet:
    """Build a registered supernet, e.g. ``create_supernet("resnet50", num_classes=1000)``."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown supernet {name!r}.{hint} Available: {', '.join(list_supernets())}")
    return _REGISTRY[name](**kwargs)


@torch.no_grad()
def load_pretrained(net: Supernet, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Load a static model's weights (e.g. torchvision's) into the supernet's largest subnet.

    Families name their modules as torchvision does, so keys match one to one. BatchNorm
    running statistics of the static model seed *every* width's private statistics (their first
    ``k`` channels); run BN recalibration afterwards for exact narrow-subnet statistics.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        raise ValueError(
            f"state dict does not match {type(net).__name__}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for key, src in state_dict.items():
        if key not in own:
            continue
        dst = own[key]
        if dst.shape == src.shape:
            dst.copy_(src)
        elif dst.dim() == src.dim() + 1 and dst.shape[1:] == src.shape:  # per-width BN stats
            dst.copy_(src.expand_as(dst))
        elif dst.dim() == 1 and src.dim() == 0:  # per-width num_batches_tracked
            dst.fill_(src.item())
        else:
            raise ValueError(
                f"shape mismatch for {key}: supernet {tuple(dst.shape)}, given {tuple(src.shape)}"
            )


def arch_of(space: SearchSpace, arch: Mapping[str, int] | Arch) -> Arch:
    """Validate ``arch`` against ``space`` (kept as a function so families share one call)."""
    return space.validate(arch)
