"""The double-headed gate of DS-Net: one module, two heads (attention and slimming)."""

from __future__ import annotations

import math

import torch
from torch import nn


class DynamicGate(nn.Module):
    """Double-headed gate of DS-Net on features ``[B, C, H, W]`` (or tokens ``[B, N, C]``).

    ``forward(x) -> (scaled_x, logits)``. Plain torch layers: the features before the gate have
    one fixed width for every route, so nothing here is sliced. For tokens (a ViT's stage
    output) the gate reads the class token ``x[:, 0]`` and scales the channels of every token.

    Cost: ``C*R + R*C + R*n_routes`` MACs per image (:meth:`macs`), independent of the image size.
    """

    def __init__(
        self,
        channels: int,
        routes: int,
        reduction: int = 4,
        hidden: int | None = None,
        tokens: bool = False,
    ):
        super().__init__()
        if routes < 2:
            raise ValueError(f"a gate needs at least 2 routes to choose from, got {routes}")
        if channels < 1 or reduction < 1:
            raise ValueError(f"DynamicGate: channels ({channels}) and reduction ({reduction}) must be >= 1")
        hidden = max(1, round(channels / reduction)) if hidden is None else hidden
        self.channels, self.routes, self.hidden, self.tokens = channels, routes, hidden, tokens
        self.reduce = nn.Conv2d(channels, hidden, 1)  # the shared trunk of both heads
        self.relu = nn.ReLU(inplace=True)
        self.attention = nn.Conv2d(hidden, channels, 1)
        self.slimming = nn.Conv2d(hidden, routes, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, routes={self.routes}, tokens={self.tokens}"

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        """The shared trunk: pooled (or class-token) features -> ``[B, R, 1, 1]``."""
        if self.tokens:
            pooled = x[:, 0, :, None, None]
        else:
            pooled = x.mean((2, 3), keepdim=True)
        return self.relu(self.reduce(pooled))

    def scale(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Attention head: ``x`` scaled channel-wise by ``sigmoid(attention(z))``."""
        s = torch.sigmoid(self.attention(z))  # [B, C, 1, 1]
        if self.tokens:
            s = s.flatten(1)[:, None, :]  # [B, 1, C]: every token, same channel scale
        return x * s

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Attention head only (Stage I: the slimming head is not computed, so it has no unused
        parameters in a DDP step)."""
        return self.scale(x, self.squeeze(x))

    def route_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The slimming head: route logits ``[B, n_routes]`` from the squeezed features ``z``."""
        return self.slimming(z).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.squeeze(x)
        return self.scale(x, z), self.route_logits(z)

    @torch.no_grad()
    def start_near_identity(self, scale: float = 0.98) -> None:
        """Make the attention head scale every channel by ``scale`` whatever the input.

        For a gate added to a network trained without one (``train.init_from`` a plain network):
        a fresh attention head would scale each channel by a random ~0.5 and the trained
        function, and so the frozen teacher made from it, would be lost. A sigmoid never reaches
        1; at 0.98 the trained network's validation accuracy is unchanged (resnet_small on
        Fashion-MNIST, docs/ACCURACY_NOTES.md) and the head still has a gradient
        (``scale * (1 - scale)``) to learn from. The shared squeeze keeps its initialisation.
        """
        check_identity_scale(scale)
        self.attention.weight.zero_()
        self.attention.bias.fill_(math.log(scale / (1 - scale)))

    def macs(self) -> int:
        """MACs per image of a full gate call (both heads), as torch's FLOP counter counts them."""
        return self.channels * self.hidden + self.hidden * self.channels + self.hidden * self.routes


def check_identity_scale(scale: float) -> None:
    """Raise unless ``scale`` is one :meth:`DynamicGate.start_near_identity` can give: [0.5, 1)."""
    if not 0.5 <= scale < 1:
        raise ValueError(f"scale={scale}: give a value in [0.5, 1) (a sigmoid never reaches 1)")
