"""Multi-head self-attention sliced by heads and embedding width (DS-Net++ for transformers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import SlicedLinear


class SlicedAttention(nn.Module):
    """Self-attention whose subnet uses the first ``heads`` heads and ``embed`` features.

    The head dimension is fixed, so slicing heads slices rows of q, k and v (fused as in timm's
    ``qkv`` layout) and the matching input columns of the output projection. The embedding
    width in and out is the residual stream's, given by the Arch.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int = 64, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = SlicedLinear(embed_dim, num_heads * head_dim, bias=qkv_bias, chunks=3)
        self.proj = SlicedLinear(num_heads * head_dim, embed_dim)

    def forward(self, x: torch.Tensor, heads: int, embed: int) -> torch.Tensor:
        if not 0 < heads <= self.num_heads:
            raise ValueError(f"SlicedAttention: heads {heads} outside 1..{self.num_heads}")
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(x, heads * self.head_dim).reshape(b, n, 3, heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, heads * self.head_dim), embed)
