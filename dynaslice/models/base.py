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

    Every family is a stem, ``n_stages`` stages and a head, each taking the Arch explicitly.
    That split is the one place where a gate can sit (DS-Net routes after a stage) and where a
    gated model is cut for export. Subclasses set ``space`` (their :class:`SearchSpace`),
    ``input_size`` (default ``(C, H, W)`` for MAC counting and export), ``num_classes`` and
    ``n_stages``, and implement the three ``forward_*`` methods and ``stage_dims``.
    """

    space: SearchSpace
    input_size: tuple[int, int, int]
    num_classes: int
    n_stages: int

    def forward_stem(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_stage(self, i: int, x: torch.Tensor, arch: Arch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def stage_dims(self, i: int) -> tuple[str, ...]:  # pragma: no cover
        """Names of the dimensions read by stage ``i`` (``-1``: the stem, ``n_stages``: the head)."""
        raise NotImplementedError

    def default_gate_cut(self) -> int:
        """The stage a DS-Net gate sits before by default: after the middle stage. Families where
        another place is better override it (DS-MBNet: before its first sliced stage)."""
        return self.n_stages // 2

    def gate_split(self, cut: int | str | None) -> tuple[Supernet, int, int | str]:
        """Where a DS-Net gate goes for ``model.gate.cut``: ``(the net it wraps, the stage it sits
        before, the cut as a model file records it)``. A zoo family is cut at a stage number
        (``None``: :meth:`default_gate_cut`); a converted network at a module path, which splits it."""
        if cut is None:
            cut = self.default_gate_cut()
        if isinstance(cut, str):
            raise ValueError(
                f"gate cut {cut!r}: {type(self).__name__} is cut at a stage number (0..{self.n_stages - 1}); "
                "module paths name the cuts of networks converted by make_supernet"
            )
        return self, cut, cut

    def dims_before(self, cut: int) -> tuple[str, ...]:
        """Dimensions that the stem and stages ``0..cut-1`` read (fixed for all routes of a gate at ``cut``)."""
        names = [n for i in range(-1, cut) for n in self.stage_dims(i)]
        return tuple(dict.fromkeys(names))

    def forward_to(self, x: torch.Tensor, arch: Arch, cut: int) -> torch.Tensor:
        """Stem and stages ``0..cut-1``."""
        x = self.forward_stem(x, arch)
        for i in range(cut):
            x = self.forward_stage(i, x, arch)
        return x

    def forward_from(self, x: torch.Tensor, arch: Arch, cut: int) -> torch.Tensor:
        """Stages ``cut..n_stages-1`` and the head."""
        for i in range(cut, self.n_stages):
            x = self.forward_stage(i, x, arch)
        return self.forward_head(x, arch)

    def forward(self, x: torch.Tensor, arch: Mapping[str, int]) -> torch.Tensor:
        arch = self.space.validate(arch)
        return self.forward_from(self.forward_to(x, arch, 0), arch, 0)


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


def create_registered(name: str, **kwargs) -> Supernet:
    """Build a registered supernet (``create_supernet`` also converts ``source:factory`` names)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown supernet {name!r}.{hint} Available: {', '.join(list_supernets())}; or convert "
            "torchvision:<model>, timm:<model> or package.module:factory"
        )
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
