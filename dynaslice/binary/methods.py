"""The binary-network methods by name: which convolution, which activation, which per-epoch schedule.

One :class:`Method` per arm of issue 30's experiments. What differs between arms is only here:

- ``conv``: the binary convolution class (``None``: full precision, the same graph with
  ``nn.Conv2d``). Its ``decayed`` attribute is the method's weight-decay rule for the layer's
  own parameters (:func:`dynaslice.train.optim.param_groups` reads it): the plain baseline
  decays its latent weights (like any conv); ReCU its latent weights and ``alpha`` (the
  official code decays every parameter); SiMaN neither (``SiManWDConv2d``: the latent weights).
  Every other parameter follows the project's rule in every arm: conv and linear weights
  decayed, BatchNorm, PReLU and biases not.
- ``act``: hardtanh (Bi-Real, ReCU) or PReLU (SiMaN's ResNet-20).
- ``epoch_hook(model, epoch, epochs)``: ReCU's tau, SiMaN's clipping percentile, set on every
  binary layer before each epoch (0-based ``epoch`` of ``epochs``).

SiMaN's official name filter, ``'layer' in name and 'conv' in name`` (ResNets), takes weight
decay off every parameter named like ``layerN.M.convK.*``: the binary convs' latent weights and
their ``alpha`` (and ``B``, which has no gradient). It leaves decay (5e-4) on everything else,
BatchNorm and PReLU included, and on ResNet-18's binary 1x1 ``shortcut.0`` convs, whose names lack
"conv". We follow the intent by type, not name: no decay on any SiMaN layer's latent weights or
``alpha`` (our shortcuts have no convs), and the project's rule for the rest (no decay on
BatchNorm and PReLU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..registry import Registry
from .layers import (
    BinaryConv2d,
    PlainBinaryConv2d,
    ReCUConv2d,
    SiManConv2d,
    SiManWDConv2d,
    SiManZeroOneConv2d,
)
from .models import BinaryResNet, binary_resnet_small

EpochHook = Callable[[nn.Module, int, float], None]

TAU_MIN, TAU_MAX = 0.85, 0.99  # ReCU's official schedule ends
CLIP_PERCENT = 15.0  # SiMaN's official clipping percentile at epoch 0


def recu_tau(epoch: int, epochs: float, tau_min: float = TAU_MIN, tau_max: float = TAU_MAX) -> float:
    """ReCU's exponential schedule, as the official ``cpt_tau``: ``A e^(epoch/epochs) + B`` with
    ``A = (tau_max - tau_min) / (e - 1)``, ``B = tau_min - A``: ``tau_min`` at epoch 0, rising to
    ``tau_max`` at ``epoch == epochs`` (the last epoch, ``epochs - 1``, runs just below it)."""
    a = (tau_max - tau_min) / (math.e - 1)
    return a * math.exp(epoch / epochs) + tau_min - a


def siman_percent(epoch: int, epochs: float, start: float = CLIP_PERCENT) -> float:
    """SiMaN's clipping percentile ``15 (1 - epoch / epochs)``: 15 at epoch 0, falling linearly
    (``15 / epochs`` at the last epoch, 0 only after it)."""
    return start * (1 - epoch / epochs)


def _set_buffer(name: str, value: float, model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            getattr(m, name).fill_(value)


@dataclass(frozen=True)
class Method:
    """One arm: the convolution class (None: full precision), the activation, the per-epoch hook
    ``epoch_hook(model, epoch, epochs)`` (what the arm sets on its layers before each epoch)."""

    conv: type[BinaryConv2d] | None
    act: str
    epoch_hook: EpochHook
    about: str = field(default="", compare=False)
    check: Callable[[Any], None] | None = field(default=None, compare=False)


_METHODS: Registry[Method] = Registry("binary method")


def register_binary(
    name: str, *, conv: type[BinaryConv2d] | None, act: str, about: str = "", check: Callable[[Any], None] | None = None
) -> Callable[[EpochHook], EpochHook]:
    """Register the decorated per-epoch hook as binary method ``name`` with its convolution class
    and activation (the pattern of ``register_pruner`` / ``register_sampler`` / ``register_target``:
    one decorator in the method's module, the registry the only list of names). ``check(bcfg)``:
    the method's own rules on the ``binary:`` section, if any."""

    def register(hook: EpochHook) -> EpochHook:
        _METHODS.add(name, Method(conv, act, hook, about, check))
        return hook

    return register


def binary_method_names() -> tuple[str, ...]:
    return _METHODS.names()


def method(name: str) -> Method:
    """The registered method ``name``, or a one-line ValueError listing them."""
    return _METHODS.get(name)


@register_binary("fp", conv=None, act="hardtanh", about="full precision, the same graph")
def _full_precision(model: nn.Module, epoch: int, epochs: float) -> None:
    """Nothing to schedule."""


@register_binary("bnn", conv=PlainBinaryConv2d, act="hardtanh", about="plain BNN: sign + STE, mean|w| scale, ApproxSign")
def _plain(model: nn.Module, epoch: int, epochs: float) -> None:
    """Nothing to schedule."""


@register_binary("recu", conv=ReCUConv2d, act="hardtanh", about="ReCU, tau 0.85 -> 0.99 (exponential, per epoch)")
def _tau_schedule(model: nn.Module, epoch: int, epochs: float) -> None:
    _set_buffer("tau", recu_tau(epoch, epochs), model)


@register_binary("recu_tau085", conv=ReCUConv2d, act="hardtanh", about="ReCU, tau fixed at 0.85")
def _tau_085(model: nn.Module, epoch: int, epochs: float) -> None:
    _set_buffer("tau", TAU_MIN, model)


@register_binary("recu_tau099", conv=ReCUConv2d, act="hardtanh", about="ReCU, tau fixed at 0.99")
def _tau_099(model: nn.Module, epoch: int, epochs: float) -> None:
    _set_buffer("tau", TAU_MAX, model)


@register_binary("siman", conv=SiManConv2d, act="prelu", about="SiMaN as its code: balanced 2B-1, clip 15(1-e/E)")
def _clip_schedule(model: nn.Module, epoch: int, epochs: float) -> None:
    _set_buffer("percent", siman_percent(epoch, epochs), model)


@register_binary("siman_wd", conv=SiManWDConv2d, act="prelu", about="SiMaN with weight decay on latent weights")
def _clip_schedule_wd(model: nn.Module, epoch: int, epochs: float) -> None:
    _clip_schedule(model, epoch, epochs)


@register_binary("siman_noclip", conv=SiManConv2d, act="prelu", about="SiMaN without the percentile clip")
def _no_clip(model: nn.Module, epoch: int, epochs: float) -> None:
    _set_buffer("percent", 0.0, model)


@register_binary("siman01", conv=SiManZeroOneConv2d, act="prelu", about="SiMaN with the paper's {0,+1} weights")
def _clip_schedule_01(model: nn.Module, epoch: int, epochs: float) -> None:
    _clip_schedule(model, epoch, epochs)


def build_binary_model(name: str, *, width_mult: float = 1.0, in_chans: int = 1, num_classes: int = 10) -> BinaryResNet:
    """The binary small ResNet of method ``name`` (what ``dynaslice binarize`` trains and saves)."""
    m = method(name)
    return binary_resnet_small(m.conv, width_mult=width_mult, act=m.act, in_chans=in_chans, num_classes=num_classes)


def binary_model_spec(name: str, width_mult: float, in_chans: int, num_classes: int) -> dict[str, Any]:
    """The keywords of :func:`build_binary_model` as saved in a binary run's ``model.pt``."""
    return {"method": name, "width_mult": width_mult, "in_chans": in_chans, "num_classes": num_classes}
