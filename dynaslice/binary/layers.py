"""Binary convolutions: one base class that fixes what a binary layer computes, one subclass per
method (the plain XNOR-Net / Bi-Real baseline here; ReCU and SiMaN beside it).

The contract every subclass keeps, because the 1-bit kernel must reproduce it exactly:

- activations are binarised by :func:`binarize` -- ``+1`` where ``t >= 0``, else ``-1`` (never
  ``torch.sign``, whose ``sign(0) = 0`` has no 1-bit code) -- after the layer's
  ``center`` step (SiMaN standardises each sample; ``t = x - mean_sample(x)`` has the same signs
  as the standardised input, so the kernel only centres);
- the weights used in the forward are a fixed tensor of ``+-1`` in eval (:meth:`binary_weight`);
- the output is ``conv2d(binarize(t), binary_weight, stride, padding) * scale[c]``, the padding
  being zeros (a padded position contributes nothing: the kernel counts valid positions only).

:meth:`BinaryConv2d.deploy_spec` returns exactly these pieces (signs, scale, stride, padding,
centring) for export and for the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class _ApproxSign(torch.autograd.Function):
    """Forward ``+-1`` (``t >= 0 -> +1``); backward Bi-Real's ApproxSign ``g * max(0, 2 - 2|t|)``."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(t)
        return binarize(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (t,) = ctx.saved_tensors
        return grad * (2 - 2 * t.abs()).clamp(min=0)


def binarize(t: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``t >= 0``, else ``-1``, in ``t``'s dtype (no gradient: see :func:`approx_sign`)."""
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


def approx_sign(t: torch.Tensor) -> torch.Tensor:
    """:func:`binarize` with ApproxSign's gradient (the activation binariser of Bi-Real, ReCU, SiMaN)."""
    return _ApproxSign.apply(t)


def center_per_sample(x: torch.Tensor) -> torch.Tensor:
    """``x`` minus each sample's mean over (C, H, W): the sign-relevant part of SiMaN's standardisation."""
    return x - x.mean(dim=(1, 2, 3), keepdim=True)


@dataclass(frozen=True)
class BinaryConvSpec:
    """What a trained binary conv computes in eval, in the form the export and the kernel read.

    ``out = conv2d(binarize(center(x) if center else x), weight, stride, padding) * scale[:, None, None]``
    with ``weight`` of ``+-1`` (int8, ``[out, in, kh, kw]``) and zero padding.
    """

    weight: torch.Tensor  # int8, +-1
    scale: torch.Tensor  # float32 [out]
    stride: int
    padding: int
    center: bool


class BinaryConv2d(nn.Conv2d):
    """A convolution with 1-bit weights and activations (no bias, groups = 1, dilation = 1).

    Subclasses define the method: :meth:`binary_weight` (the ``+-1`` weights, with the
    method's gradient to the latent weights), :meth:`scale` (per output channel) and
    :meth:`prepare_input` (what is binarised: ``x``, or ``x`` standardised per sample).
    ``center`` says whether the deployed layer centres each sample before the sign.
    ``decayed`` names the layer's own parameters that weight decay applies to (the method's
    rule: ReCU decays its latent weights and scale, SiMaN neither).
    """

    center: bool = False
    decayed: tuple[str, ...] = ("weight",)  # own parameters that take weight decay (dynaslice.train.optim)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)

    def weight_decay_parameters(self) -> list[nn.Parameter]:
        """The parameters of this layer that weight decay applies to: a method's rule (SiMaN
        decays none), read by :func:`dynaslice.train.optim.param_groups`."""
        return [getattr(self, name) for name in self.decayed]

    def binary_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def scale(self) -> torch.Tensor:
        raise NotImplementedError

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return center_per_sample(x) if self.center else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = approx_sign(self.prepare_input(x))
        out = F.conv2d(xb, self.binary_weight(), None, self.stride, self.padding)
        return out * self.scale().view(1, -1, 1, 1)

    @torch.no_grad()
    def deploy_spec(self) -> BinaryConvSpec:
        """The eval-mode layer as signs + scales (see :class:`BinaryConvSpec`)."""
        w = self.binary_weight().detach()
        if not bool(((w == 1) | (w == -1)).all()):
            raise ValueError(f"{type(self).__name__}'s weights are not +-1: it has no 1-bit deployment")
        return BinaryConvSpec(
            weight=w.to(torch.int8),
            scale=self.scale().detach().float().clone(),
            stride=int(self.stride[0]),
            padding=int(self.padding[0]),
            center=self.center,
        )


class PlainBinaryConv2d(BinaryConv2d):
    """The plain baseline (XNOR-Net / Bi-Real): ``sign(w)`` with a straight-through gradient clipped
    to ``|w| <= 1``, per-output-channel scale ``mean|w|``, ApproxSign activations."""

    def binary_weight(self) -> torch.Tensor:
        w = self.weight
        ste = w.clamp(-1, 1)  # identity gradient inside [-1, 1], zero outside
        return binarize(w) + (ste - ste.detach())  # exact +-1 forward: add the zero last

    def scale(self) -> torch.Tensor:
        return self.weight.abs().mean(dim=(1, 2, 3))


class ReCUConv2d(BinaryConv2d):
    """ReCU (Xu et al., ICCV 2021), as ``z-hXu/ReCU``'s ``BinarizeConv2d`` computes it.

    Weights: each filter is standardised, ``w1 = (w - mean) / (std / (2 sqrt 2))``, then clamped
    to ``[-Q, Q]`` with ``Q = -mean|w1| ln(2 - 2 tau)`` (detached), and binarised with an identity
    straight-through gradient. Clamping keeps signs, so the forward is ``sign(w - mean)``; the
    clamp only zeroes the gradient of the "dead" weights beyond ``Q``, which weight decay (on
    the latent weights, as the official recipe) pulls back. ``tau`` is a buffer the trainer
    sets every epoch (:func:`dynaslice.binary.methods.recu_tau`).

    Activations: in training only, each sample is divided by its standard deviation before
    ApproxSign (this moves the gradient window, never a sign); in eval, ``x`` itself.

    Scale: a learnable per-channel ``alpha`` initialised with ``torch.rand`` as the official code
    does (from the global RNG: the trainer's seed fixes it).
    """

    decayed = ("weight", "alpha")  # the official recipe decays every parameter (5e-4)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding)
        self.alpha = nn.Parameter(torch.rand(out_channels))
        self.register_buffer("tau", torch.tensor(0.85))  # the schedule's first value until a trainer sets it

    def standardized_weight(self) -> torch.Tensor:
        """``w1``: each filter centred and divided by ``std / (2 sqrt 2)`` (unbiased variance + 1e-5)."""
        w0 = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return w0 / (torch.sqrt(w0.var(dim=(1, 2, 3), keepdim=True) + 1e-5) / (2 * math.sqrt(2)))

    def binary_weight(self) -> torch.Tensor:
        w1 = self.standardized_weight()
        q = (-w1.abs().mean() * torch.log(2 - 2 * self.tau)).detach()
        w2 = torch.clamp(w1, -q, q)
        return binarize(w2) + (w2 - w2.detach())  # identity straight-through, exact +-1 forward

    def scale(self) -> torch.Tensor:
        return self.alpha

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x / torch.sqrt(x.var(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return x


class SiManConv2d(BinaryConv2d):
    """SiMaN (Lin et al., TPAMI 2022), as ``lmbxmu/SiMaN``'s ``BinarizeConv2d`` computes it.

    Weights: the code's, not the paper's {0,+1}: in training, each filter's standardised
    magnitudes ``X = |(w - mean) / std|`` are ranked and the top half (``X`` above the filter's
    median) becomes ``+1``, the rest ``-1`` -- ``2B - 1``, balanced per filter, the latent sign
    ignored -- with a straight-through gradient to ``X``. ``B`` is a buffer kept for eval.
    Before that, every training forward recentres each filter and clips the layer's magnitudes
    to the ``[percent, 100 - percent]`` percentiles (``percent`` is a buffer the trainer sets
    every epoch, :func:`dynaslice.binary.methods.siman_percent`; 0: no clip).

    Activations: each sample standardised over (C, H, W), in train and eval (``center = True``:
    the deployed layer only centres, which gives the same signs), then ApproxSign.

    Scale: learnable per-channel ``alpha``, initialised to ``mean|w|`` of the initial weights.
    No weight decay on the latent weights or ``alpha`` (the official name filter's intent; see
    :mod:`dynaslice.binary.methods`).

    Differences from the official code: the recentring and clipping of the latent weights run
    in training forwards only (the code also rewrites the weights in eval, which changes no
    eval output since ``B`` is fixed there); the percentiles come from ``torch.quantile``
    (linear interpolation, as ``numpy.percentile``) on the weight's own device.
    """

    center = True
    decayed: tuple[str, ...] = ()
    zero_one = False  # the paper's {0,+1} weights (an ablation: no +-1 deployment)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding)
        w = self.weight.detach()
        self.alpha = nn.Parameter(w.abs().mean(dim=(1, 2, 3)).clone())
        self.register_buffer("B", (w >= 0).flatten(1).float())  # the code's (sign(w) + 1) / 2 until trained
        self.register_buffer("percent", torch.tensor(0.0))

    def magnitudes(self) -> torch.Tensor:
        """``X``: each filter's standardised magnitudes, ``[out, in * kh * kw]`` (unbiased variance + 1e-5)."""
        w1 = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return (w1 / torch.sqrt(w1.var(dim=(1, 2, 3), keepdim=True) + 1e-5)).abs().flatten(1)

    @torch.no_grad()
    def update_latent(self) -> None:
        """One training forward's updates: recentre and clip the latent weights, then rank ``B``."""
        w1 = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        mag = w1.abs()
        p = float(self.percent) / 100
        lo, hi = torch.quantile(mag.flatten(), torch.tensor([p, 1 - p], dtype=mag.dtype, device=mag.device))
        self.weight.copy_(torch.sign(w1) * mag.clamp(lo, hi))
        x = self.magnitudes()
        self.B.copy_((x > x.median(dim=1, keepdim=True).values).float())

    def binary_weight(self) -> torch.Tensor:
        x = self.magnitudes()
        levels = self.B if self.zero_one else 2 * self.B - 1
        return (levels + (x - x.detach())).view_as(self.weight)

    def scale(self) -> torch.Tensor:
        return self.alpha

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        x0 = center_per_sample(x)
        return x0 / torch.sqrt(x0.var(dim=(1, 2, 3), keepdim=True) + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update_latent()
        return super().forward(x)


class SiManWDConv2d(SiManConv2d):
    """SiMaN with weight decay on its latent weights (an ablation of the official rule)."""

    decayed = ("weight",)


class SiManZeroOneConv2d(SiManConv2d):
    """SiMaN with the paper's {0,+1} weights (``B`` itself) instead of the code's ``2B - 1``: an
    ablation; :meth:`deploy_spec` refuses it (no 1-bit +-1 deployment)."""

    zero_one = True
