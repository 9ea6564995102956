"""DS-ViT: a Vision Transformer (DeiT shapes) sliced in embedding width, heads, MLP width and depth.

DS-Net++ extends dynamic weight slicing to transformers: a subnet uses the first ``embed``
features of the residual stream (LayerNorm ``gamma/beta[:embed]`` too), the first ``heads``
attention heads (rows of q, k, v and the matching input columns of the projection), the first
``mlp`` hidden units of every MLP (rows of ``fc1``, columns of ``fc2``), and the first ``depth``
blocks. Module names follow timm's ``vision_transformer.py`` (``blocks.3.attn.qkv``,
``blocks.3.mlp.fc1``, ``norm``, ``head``).

Search space (one value per dimension, shared by all blocks -- the DS-Net++ choice, and it keeps
the space small enough to train with a sandwich rule and to gate):

- ``embed``: ``make_divisible(r * embed_dim, divisor)`` for DS-Net's ratios r in 0.35:0.05:1.0
  (DeiT-Ti: 64, 80, ..., 192 in steps of 16);
- ``heads``: 1 .. num_heads, with a fixed head dimension (64 in DeiT), so the attention width is
  ``heads * head_dim`` whatever ``embed`` is;
- ``mlp``: the same ratios applied to the MLP hidden width;
- ``depth`` (kind "depth"): the last ``depth_choices`` values up to the full depth (9..12 for
  DeiT); blocks ``>= depth`` are skipped. :meth:`SearchSpace.uniform` keeps it at its maximum.

The class token is folded into the position embedding: ``cat(cls, x) + pos`` equals
``pad(x, one zero token in front) + pos'`` with ``pos'[0] = pos[0] + cls``. That makes the stem a
patch-embedding conv plus one position table, i.e. ``nn.Conv2d`` and ``nn.Embedding`` in the
extracted subnet (a plain torch model), and saves one redundant vector. To import timm/DeiT
weights, add ``cls_token`` to row 0 of ``pos_embed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import SlicedAttention, SlicedConv2d, SlicedLayerNorm, SlicedLinear, SlicedModule
from ..nn.base import as_parameter, check_width
from ..space import Arch, Dim, SearchSpace, dsnet_ratios, width_grid
from .base import Supernet, register_supernet


class PositionEmbedding(SlicedModule):
    """One learned vector per token position (row 0: the class token), columns ``[:embed]``.

    It is looked up by position index (``forward(positions, embed)``), like nanoGPT's ``wpe``,
    so its static twin is a plain ``nn.Embedding``. The table has exactly one row per token of
    the input size the model was built for; any other token count is an error, not a silent
    misalignment of positions.
    """

    def __init__(self, num_positions: int, embed_dim: int, grid_size: int, patch_size: int):
        super().__init__()
        self.num_positions, self.embed_dim = num_positions, embed_dim
        self.grid_size, self.patch_size = grid_size, patch_size  # for error messages only
        self.weight = nn.Parameter(torch.zeros(num_positions, embed_dim))

    def extra_repr(self) -> str:
        return f"{self.num_positions}, {self.embed_dim}"

    def _check(self, n: int, embed: int) -> None:
        if n != self.num_positions:
            side = self.grid_size * self.patch_size
            raise ValueError(
                f"the ViT got {n - 1} patches but was built for {side}x{side} inputs "
                f"({self.num_positions - 1} patches of {self.patch_size}x{self.patch_size}); "
                "feed that size or build the model with input_size=<your image side>"
            )
        check_width(self, "embed", embed, self.embed_dim)

    def forward(self, positions: torch.Tensor, embed: int) -> torch.Tensor:
        self._check(positions.shape[0], embed)
        return F.embedding(positions, self.weight[:, :embed])

    def to_static(self, in_shape: torch.Size, embed: int) -> nn.Embedding:
        self._check(in_shape[0], embed)
        emb = nn.Embedding(self.num_positions, embed, device="meta")
        emb.weight = as_parameter(self.weight[:, :embed])
        return emb


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2: hidden units ``[:mlp]``, output back to the residual width ``embed``."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = SlicedLinear(embed_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = SlicedLinear(hidden, embed_dim)

    def forward(self, x: torch.Tensor, mlp: int, embed: int) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x, mlp)), embed)


class Block(nn.Module):
    """A pre-norm transformer block (DeiT): ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = SlicedLayerNorm(embed_dim)
        self.attn = SlicedAttention(embed_dim, num_heads, head_dim)
        self.norm2 = SlicedLayerNorm(embed_dim)
        self.mlp = Mlp(embed_dim, mlp_hidden)

    def forward(self, x: torch.Tensor, embed: int, heads: int, mlp: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), heads, embed)
        return x + self.mlp(self.norm2(x), mlp, embed)


class DSViT(Supernet):
    """ViT supernet. Stem: patch embedding + position table; stage ``i``: block ``i``; head:
    final LayerNorm on the class token and a linear classifier.

    ``input_size`` (the image side) fixes the number of tokens, hence the position table.
    ``ratios``/``divisor`` make the ``embed`` and ``mlp`` grids; ``depth_choices`` is how many
    depths (ending at ``depth``) the space allows.
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_hidden: int = 768,
        head_dim: int = 64,
        patch_size: int = 16,
        input_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        ratios: Sequence[float] | None = None,
        divisor: int = 16,
        depth_choices: int = 4,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if not 0 < depth_choices <= depth:
            raise ValueError(f"depth_choices must be in 1..{depth}, got {depth_choices}")
        ratios = dsnet_ratios() if ratios is None else tuple(ratios)
        self.num_classes, self.n_stages = num_classes, depth
        self.input_size = (in_chans, input_size, input_size)
        self.space = SearchSpace(
            (
                Dim("embed", width_grid(embed_dim, ratios, divisor)),
                Dim("heads", tuple(range(1, num_heads + 1))),
                Dim("mlp", width_grid(mlp_hidden, ratios, divisor)),
                Dim("depth", tuple(range(depth - depth_choices + 1, depth + 1)), kind="depth"),
            )
        )
        self._min_depth = self.space["depth"].min

        grid = input_size // patch_size
        self.patch_embed = SlicedConv2d(
            in_chans, embed_dim, patch_size, stride=patch_size, padding=0, bias=True
        )
        self.pos_embed = PositionEmbedding(grid * grid + 1, embed_dim, grid, patch_size)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, head_dim, mlp_hidden) for _ in range(depth))
        self.norm = SlicedLayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = SlicedLinear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's ViT initialisation: truncated normal(0.02) for linear layers and positions.
        nn.init.trunc_normal_(self.pos_embed.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, SlicedLinear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def stage_dims(self, i: int) -> tuple[str, ...]:
        if i == -1 or i == self.n_stages:
            return ("embed",)
        # blocks below the smallest depth always run, so depth does not change them
        return ("embed", "heads", "mlp") + (("depth",) if i >= self._min_depth else ())

    def forward_stem(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        embed = arch["embed"]
        x = self.patch_embed(x, embed).flatten(2).transpose(1, 2)  # [B, patches, embed]
        x = F.pad(x, (0, 0, 1, 0))  # a zero token in front; its position vector is the class token
        positions = torch.arange(x.shape[1], device=x.device)
        return x + self.pos_embed(positions, embed)

    def forward_stage(self, i: int, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        if i >= arch["depth"]:  # depth is a Python int of the Arch: skipped blocks leave no trace
            return x
        return self.blocks[i](x, arch["embed"], arch["heads"], arch["mlp"])

    def default_gate_cut(self) -> int:
        """After the first quarter of the blocks: routing early saves the most."""
        return max(1, self.n_stages // 4)

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        # LayerNorm is per token, so normalising only the class token equals timm's norm-then-pick.
        return self.head(self.head_drop(self.norm(x[:, 0])))


@register_supernet
def vit_tiny(**kwargs) -> DSViT:
    """DS-ViT with DeiT-Tiny shapes: embed 192, 3 heads of 64, MLP 768, 12 blocks, 16x16 patches."""
    return DSViT(embed_dim=192, depth=12, num_heads=3, mlp_hidden=768, **kwargs)


@register_supernet
def vit_small(**kwargs) -> DSViT:
    """DS-ViT with DeiT-Small shapes: embed 384, 6 heads of 64, MLP 1536, 12 blocks, 16x16 patches."""
    return DSViT(embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536, **kwargs)


@register_supernet
def vit_small_input(**kwargs) -> DSViT:
    """A DS-ViT for 28-32 px images (Fashion-MNIST, CIFAR) and tests: 4x4 patches, embed 128,
    4 heads of 32, MLP 256 (ratio 2, as ViT-Lite for CIFAR), 6 blocks (depth 3..6).

    Largest subnet: 43 MMACs at 28x28 (50 tokens), 58 MMACs at 32x32 (65 tokens).
    """
    kwargs = {"input_size": 32, "num_classes": 10, "divisor": 8, **kwargs}
    return DSViT(embed_dim=128, depth=6, num_heads=4, head_dim=32, mlp_hidden=256, patch_size=4, **kwargs)
