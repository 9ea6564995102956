"""Sliced layers: equivalence with independent references, gradients, per-width BN statistics.

The references never reuse the slicing code: a subnet layer must equal the *full* layer applied to
an input zero-padded to the full width, with the unused weights zeroed, restricted to the first
outputs. That is the definition of "a contiguous slice of the supernet's weights".
"""

import random

import pytest
import torch
import torch.nn.functional as F

from dynaslice.nn import SlicedAttention, SlicedBatchNorm2d, SlicedConv2d, SlicedLayerNorm, SlicedLinear


def pad_channels(x: torch.Tensor, full: int, dim: int = 1) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = full - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


CONV_CASES = [  # (cin, cout, kernel, stride, dilation, groups, depthwise, bias)
    (16, 24, 3, 1, 1, 1, False, False),
    (16, 24, 3, 2, 1, 1, False, True),
    (8, 16, 5, 1, 2, 1, False, False),
    (16, 16, 3, 2, 1, 1, True, False),
    (16, 32, 3, 1, 1, 4, False, True),
    (12, 20, 1, 1, 1, 1, False, False),
    (16, 16, 7, 1, 1, 1, True, True),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_equals_masked_full_conv(case):
    cin, cout, k, stride, dil, groups, dw, bias = case
    torch.manual_seed(0)
    conv = SlicedConv2d(cin, cout, k, stride=stride, dilation=dil, groups=groups, bias=bias, depthwise=dw)
    rng = random.Random(0)
    for _ in range(5):
        m = rng.choice([c for c in range(groups, cin + 1) if c % groups == 0])
        kout = m if dw else rng.choice([c for c in range(groups, cout + 1) if c % groups == 0])
        ks = rng.choice([s for s in range(1, k + 1, 2)])
        x = torch.randn(2, m, 11, 13)
        y = conv(x, None if dw else kout, ks)
        # reference: full conv, input zero-padded, weights outside the slice and kernel centre zeroed
        w = conv.weight.detach().clone()
        o = (k - ks) // 2
        mask = torch.zeros_like(w)
        mask[:, :, o : o + ks, o : o + ks] = 1
        if not dw:  # per group: only the first m/groups input channels of the first kout outputs
            mask[kout:] = 0
            mask[:, m // groups :] = 0
        ref_groups = cin if dw else groups
        ref = F.conv2d(pad_channels(x, cin), w * mask, conv.bias, stride, conv.padding, dil, ref_groups)
        if groups == 1 or dw:
            torch.testing.assert_close(y, ref[:, :kout], rtol=1e-5, atol=1e-5)
        assert y.shape[1] == kout
        static = conv.to_static(x.shape, None if dw else kout, ks)
        assert type(static) is torch.nn.Conv2d
        torch.testing.assert_close(static(x), y, rtol=0, atol=0)


def test_conv_gradient_reaches_only_the_active_slice():
    conv = SlicedConv2d(16, 32, 5, bias=True)
    x = torch.randn(3, 8, 9, 9)
    conv(x, 12, 3).square().sum().backward()
    g = conv.weight.grad
    assert g[:12, :8, 1:4, 1:4].abs().min() > 0
    inactive = g.clone()
    inactive[:12, :8, 1:4, 1:4] = 0
    assert inactive.abs().max() == 0  # exactly zero outside
    assert conv.bias.grad[12:].abs().max() == 0 and conv.bias.grad[:12].abs().min() > 0


def test_conv_errors():
    conv = SlicedConv2d(8, 16, 3)
    with pytest.raises(ValueError, match="input channels 12 is outside 1..8"):
        conv(torch.randn(1, 12, 5, 5), 8)
    with pytest.raises(ValueError, match="out_channels 20"):
        conv(torch.randn(1, 8, 5, 5), 20)
    with pytest.raises(ValueError, match="centre-cropped"):
        conv(torch.randn(1, 8, 5, 5), 8, 2)


def test_linear_and_fused_qkv_slices():
    torch.manual_seed(0)
    lin = SlicedLinear(32, 24)
    x = torch.randn(4, 7, 20)
    ref = F.linear(pad_channels(x, 32, -1), lin.weight, lin.bias)[..., :10]
    torch.testing.assert_close(lin(x, 10), ref)
    qkv = SlicedLinear(32, 24, chunks=3)
    y = qkv(x, 8)
    full = F.linear(pad_channels(x, 32, -1), qkv.weight, qkv.bias)  # [.., 72] = q|k|v
    ref = torch.cat([full[..., 0:8], full[..., 24:32], full[..., 48:56]], -1)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(qkv.to_static(x.shape, 8)(x), y, rtol=0, atol=0)
    y.sum().backward()
    g = qkv.weight.grad.view(3, 24, 32)
    assert g[:, 8:].abs().max() == 0 and g[:, :, 20:].abs().max() == 0 and g[:, :8, :20].abs().min() > 0


def test_layernorm_normalises_the_active_features_only():
    ln = SlicedLayerNorm(16)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(3, 5, 10)
    ref = F.layer_norm(x, (10,), ln.weight[:10], ln.bias[:10], ln.eps)
    torch.testing.assert_close(ln(x), ref)
    torch.testing.assert_close(ln.to_static(x.shape)(x), ln(x), rtol=0, atol=0)


def test_attention_heads_slice_equals_reference():
    torch.manual_seed(0)
    att = SlicedAttention(embed_dim=32, num_heads=4, head_dim=8)
    x = torch.randn(2, 6, 24)
    y = att(x, heads=2, embed=24)
    # reference: explicit per-head attention with the first 2 heads' rows of q, k, v
    w = att.qkv.weight.view(3, 32, 32)[:, :16, :24]
    b = att.qkv.bias.view(3, 32)[:, :16]
    q, k, v = (x @ w[i].T + b[i] for i in range(3))
    heads = []
    for h in range(2):
        s = slice(8 * h, 8 * (h + 1))
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 8**0.5, -1)
        heads.append(a @ v[..., s])
    ref = torch.cat(heads, -1) @ att.proj.weight[:24, :16].T + att.proj.bias[:24]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="heads 5"):
        att(x, heads=5, embed=24)


def test_batchnorm_private_stats_per_width():
    bn = SlicedBatchNorm2d(16, widths=(8, 12, 16))
    bn.train()
    x8 = torch.randn(32, 8, 4, 4) * 3 + 5
    bn(x8)
    row8 = bn.running_mean[0].clone()
    assert row8[:8].abs().min() > 0 and row8[8:].abs().max() == 0
    bn(torch.randn(32, 16, 4, 4) - 7)  # another width must not touch width 8's statistics
    assert torch.equal(bn.running_mean[0], row8)
    assert bn.running_mean[2].mean() < 0 and bn.running_mean[1].abs().max() == 0
    assert bn.num_batches_tracked.tolist() == [1, 0, 1]
    # eval mode uses the width's own statistics
    bn.eval()
    x = torch.randn(4, 8, 3, 3)
    ref = F.batch_norm(
        x, bn.running_mean[0, :8], bn.running_var[0, :8], bn.weight[:8], bn.bias[:8], False, 0, bn.eps
    )
    torch.testing.assert_close(bn(x), ref)
    torch.testing.assert_close(bn.to_static(x.shape)(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"got 10 channels; its allowed widths are \[8, 12, 16\]"):
        bn(torch.randn(2, 10, 3, 3))


def test_batchnorm_cumulative_average_with_momentum_none():
    bn = SlicedBatchNorm2d(8, widths=(4, 8), momentum=None).train()
    batches = [torch.randn(16, 4, 3, 3) + i for i in range(5)]
    for b in batches:
        bn(b)
    expected = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean[0, :4], expected)
    assert int(bn.num_batches_tracked[0]) == 5


def test_batchnorm_gradients_only_active_affine():
    bn = SlicedBatchNorm2d(16, widths=(8, 16)).train()
    bn(torch.randn(8, 8, 4, 4)).pow(2).sum().backward()
    assert bn.weight.grad[8:].abs().max() == 0 and bn.bias.grad[8:].abs().max() == 0


def test_layers_are_stateless_between_calls():
    conv = SlicedConv2d(8, 16, 3)
    x = torch.randn(1, 8, 5, 5)
    a = conv(x, 4)
    conv(x, 16)
    torch.testing.assert_close(conv(x, 4), a, rtol=0, atol=0)
    assert conv(x).shape[1] == 16  # no argument: the full width, not the last width used


def test_inference_slice_cache_sees_in_place_updates():
    conv, bn = SlicedConv2d(8, 16, 3), SlicedBatchNorm2d(16, widths=(8, 16)).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y0 = bn(conv(x, 8))
        conv.weight.mul_(2)  # e.g. an optimizer or EMA step
        bn.running_mean.add_(1)
        y1 = bn(conv(x, 8))
    with torch.inference_mode():
        y2 = bn(conv(x, 8))
    conv.weight.data = conv.weight.data * 0.5  # a new tensor altogether
    with torch.no_grad():
        y3 = bn(conv(x, 8))
    w8 = conv.weight[:8, :4] * 1.0
    ref = F.batch_norm(
        F.conv2d(x, w8, None, 1, 1),
        bn.running_mean[0, :8],
        bn.running_var[0, :8],
        bn.weight[:8],
        bn.bias[:8],
        False,
        0,
        1e-5,
    )
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y3, ref, rtol=1e-6, atol=1e-6)
    # with gradients on, slices stay differentiable views
    conv(x, 8).sum().backward()
    assert conv.weight.grad[:8, :4].abs().sum() > 0
