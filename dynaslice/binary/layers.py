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
    """

    center: bool = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)

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
