"""make_supernet slices attention heads: each self-attention layer's heads are one width dimension.

Tiny transformers, random weights: torchvision's VisionTransformer (nn.MultiheadAttention), a
hand-written block (tokens first, its embedding sliced too) and timm's ViT (its ``Attention``).
What must hold: the heads dimension keeps whole heads (multiples of the head size, at least
one head), the largest subnet is the model, the extracted narrowest subnet equals its slice and
is plain torch (its attention has fewer q/k/v rows), ONNX on onnxruntime equals torch, MACs and
parameters are those of the extracted subnet. Attention the layer cannot slice stays whole, with
the reason.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from test_make_supernet import _check_exact
from torch import nn

import dynaslice as ds


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def convert(model: nn.Module, x: torch.Tensor) -> ds.ConvertedSupernet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.make_supernet(model, x)


def randomised_norms(model: nn.Module) -> nn.Module:
    """LayerNorm parameters away from 1 and 0, so a wrongly sliced one would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def check_exact(model: nn.Module, net: ds.ConvertedSupernet, x: torch.Tensor, tmp_path) -> nn.Module:
    """test_make_supernet's exactness checks (largest == model, extracted narrowest == its slice,
    costs, ONNX == torch), and the subnet loads without pickled dynaslice classes."""
    sub = _check_exact(model, net, x, tmp_path)
    buf = io.BytesIO()
    torch.save(sub, buf)
    assert b"dynaslice" not in buf.getvalue()  # no class of ours in the pickle
    return sub


def tiny_torchvision_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10)
    with torch.no_grad():
        vit.heads.head.weight.normal_()  # torchvision starts the head at zero
    return randomised_norms(vit)


def test_torchvision_vit_heads_are_width_dimensions_in_whole_heads(tmp_path):
    vit = tiny_torchvision_vit()
    x = torch.randn(2, 3, 32, 32)
    net = convert(vit, x)
    heads = [f"encoder.layers.encoder_layer_{i}.self_attention.heads" for i in (0, 1)]
    assert set(heads) <= set(net.space.names)
    for name in heads:  # 4 heads of 8: whole heads, at least one, the largest all of them
        choices = net.space[name].choices
        assert choices[-1] == 32 and all(c % 8 == 0 and c >= 8 for c in choices) and len(choices) > 1
    # its hidden size too: the reshape in _process_input that writes it writes the width instead
    assert "conv_proj" in net.space.names and net.kept == {"heads.head": "the model's output"}
    sub = check_exact(vit, net, x, tmp_path)
    attn = sub.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    kept, hidden = net.space.smallest()[heads[0]], net.space["conv_proj"].min
    assert attn.in_proj_weight.shape == (3 * kept, hidden) and attn.out_proj.weight.shape == (hidden, kept)
    # the converted layer keeps the model's names: a state dict of the model loads as it is
    assert set(net.state_dict()) == set(vit.state_dict())
    narrowest = ds.count_macs(net, net.space.smallest()) / ds.count_macs(net, net.space.largest())
    mlp_only = net.space.largest().replace(**{n: net.space[n].min for n in net.space.names if n not in heads})
    assert narrowest < ds.count_macs(net, mlp_only) / ds.count_macs(net, net.space.largest())
    # ordered: the hidden size, the MLP widths and the heads
    from dynaslice.ordering import reorder_channels

    assert {g.dim for g, _ in reorder_channels(net)} == set(net.space.names)
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), vit(x)) <= 1e-5


def test_a_reshape_writing_the_channel_count_is_followed_only_where_the_width_is_written():
    """The engine follows ``x.reshape(n, 32, h * w)`` (the channel axis kept, its count written)
    for make_supernet and ordering (``sizes=True``: the program writes the width there), and
    keeps it whole for pruning, whose pruned model would keep the written 32."""
    from torch import fx

    from dynaslice.graph import analyze, trace

    class Patches(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.head = nn.Conv2d(3, 32, 2, 2), nn.Linear(32, 32), nn.Linear(32, 10)

        def forward(self, x):
            y = self.conv(x)
            y = y.reshape(y.shape[0], 32, y.shape[2] * y.shape[3]).permute(0, 2, 1)
            return self.head(self.fc(y).mean(1))

    model = Patches().eval()
    x = torch.randn(2, 3, 8, 8)
    gm: fx.GraphModule = trace(model, x)
    conv = next(g for g in analyze(gm).groups.values() if g.name == "conv")
    assert "reshapes (2, 32, 4, 4) to (2, 32, 16)" in conv.fixed
    assert next(g for g in analyze(gm, sizes=True).groups.values() if g.name == "conv").fixed is None
    net = convert(model, x)
    assert "conv" in net.space.names
    with torch.no_grad():
        sliced = net(x, net.space.smallest())
        assert rel_err(ds.extract_subnet(net, net.space.smallest())(x), sliced) <= 1e-5
        assert rel_err(net(x, net.space.largest()), model(x)) <= 1e-5


class TokensFirst(nn.Module):
    """A hand-written transformer block over [tokens, batch, channels] (``batch_first=False``),
    its embedding a Linear, so the residual stream (embedding, out_proj, fc2) is sliced too."""

    def __init__(self, dim: int = 32, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.flatten(2).permute(2, 0, 1))  # [tokens, batch, dim]
        y = self.norm1(t)
        t = t + self.attn(y, y, y, need_weights=False)[0]
        t = t + self.fc2(self.act(self.fc1(self.norm2(t))))
        return self.head(t.mean(0))


def test_tokens_first_attention_slices_its_heads_and_the_embedding_around_it(tmp_path):
    torch.manual_seed(0)
    model = randomised_norms(TokensFirst())
    x = torch.randn(2, 3, 4, 4)
    net = convert(model, x)
    assert set(net.space.names) == {"embed", "attn.heads", "fc1"}  # embed: the residual stream
    assert net.space["attn.heads"].choices == (16, 24, 32)  # 2, 3 or 4 heads of 8
    sub = check_exact(model, net, x, tmp_path)
    assert sub.get_submodule("attn.out_proj").weight.shape == (net.space["embed"].min, 16)
    # trains: every parameter of the model gets a gradient through a narrow subnet
    net.train()
    net(x, net.space.smallest()).sum().backward()
    assert net.attn.in_proj_weight.grad is not None and net.attn.out_proj.weight.grad is not None
    assert net.attn.in_proj_weight.grad[16:32].abs().sum() == 0  # q rows of dropped heads untouched


def test_attention_dropout_follows_the_mode_in_the_extracted_subnet():
    torch.manual_seed(0)
    model = TokensFirst(dropout=0.5).eval()
    x = torch.randn(2, 3, 4, 4)
    net = convert(model, x)
    assert "attn.heads" in net.space.names
    sub = ds.extract_subnet(net, net.space.smallest())
    with torch.no_grad():
        assert torch.equal(sub(x), sub(x))
        sub.train()
        assert not torch.equal(sub(x), sub(x))  # the dropout layer, not a rate fixed when traced


class ReadsWeights(nn.Module):
    """Attention whose averaged weights are read (they change with the heads), and a
    cross-attention (keys from another tensor): both stay whole."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.embed, self.other = nn.Linear(3, dim), nn.Linear(3, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)  # still sliced
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.flatten(2).transpose(1, 2))
        y, w = self.attn(t, t, t)
        u = self.cross(y, self.other(x.flatten(2).transpose(1, 2)), t, need_weights=False)[0]
        return self.head(self.fc2(self.fc1(u * w.mean(-1, keepdim=True)).relu()).mean(1))


def test_attention_whose_weights_are_read_or_that_attends_to_another_tensor_stays_whole():
    torch.manual_seed(0)
    model = ReadsWeights().eval()
    x = torch.randn(2, 3, 4, 4)
    net = convert(model, x)
    assert "fc1" in net.space.names and not any(n.endswith(".heads") for n in net.space.names)
    reasons = " ".join(net.kept.values())
    assert "attn (MultiheadAttention): its attention weights are read" in reasons
    assert "cross (MultiheadAttention) takes several tensors" in reasons
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), model(x)) <= 1e-5


def test_channel_ordering_sorts_whole_heads_by_importance():
    """Heads move as blocks: each head's q, k, v rows and output columns together, the most
    important head (by its output-projection columns) first; the largest subnet stays the model."""
    from dynaslice.ordering import reorder_channels

    torch.manual_seed(0)
    model = randomised_norms(TokensFirst())
    with torch.no_grad():
        model.attn.out_proj.weight[:, 24:32] *= 10  # head 3 matters most
    x = torch.randn(2, 3, 4, 4)
    net = convert(model, x)
    perms = dict((g.dim, p) for g, p in reorder_channels(net))
    assert sorted(perms) == ["attn.heads", "embed", "fc1"]
    heads = perms["attn.heads"].view(4, 8)
    assert heads[0].tolist() == list(range(24, 32))  # whole heads, in order inside
    assert all(h.tolist() == list(range(h[0], h[0] + 8)) and h[0] % 8 == 0 for h in heads)
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), model(x)) <= 1e-5
        # the k rows of the new first head are head 3's (their columns follow the embedding's order)
        moved, source = net.attn.in_proj_weight[32:40], model.attn.in_proj_weight[56:64]
        assert torch.equal(moved.sort(1)[0], source.sort(1)[0])


def test_timm_vit_attention_slices_heads_and_the_embedding(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10,
        qk_norm=True,
    )  # fmt: skip
    vit = randomised_norms(vit)
    x = torch.randn(2, 3, 32, 32)
    net = convert(vit, x)
    assert {"patch_embed.proj", "blocks.0.attn.heads", "blocks.1.attn.heads", "blocks.0.mlp.fc1"} <= set(
        net.space.names
    )
    assert net.space["blocks.0.attn.heads"].choices == (16, 24, 32)
    sub = check_exact(vit, net, x, tmp_path)
    kept = net.space.smallest()["blocks.0.attn.heads"]
    assert sub.get_submodule("blocks.0.attn.qkv").weight.shape == (
        3 * kept,
        net.space["patch_embed.proj"].min,
    )
    assert set(net.state_dict()) == set(vit.state_dict())
    # ordered too: its patch embedding reads the input's channel count, which stays whole anyway
    from dynaslice.ordering import reorder_channels

    assert {"patch_embed.proj", "blocks.0.attn.heads"} <= {g.dim for g, _ in reorder_channels(net)}
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), vit(x)) <= 1e-5
