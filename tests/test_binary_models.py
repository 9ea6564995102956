"""The binary small ResNet (issue 30 item 1): its shape, its binary/FP arms, and that it trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynaslice.binary.layers import BinaryConv2d, PlainBinaryConv2d
from dynaslice.binary.models import PoolPadShortcut, binary_resnet_small

torch.set_num_threads(1)


@pytest.mark.parametrize("conv", [PlainBinaryConv2d, None])
@pytest.mark.parametrize("act", ["hardtanh", "prelu"])
def test_trains_a_step(conv, act):
    torch.manual_seed(0)
    model = binary_resnet_small(conv, width_mult=0.5, act=act)
    x, y = torch.randn(4, 1, 12, 12), torch.randint(0, 10, (4,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    # every convolution's latent weights move: the gradient passes every sign and shortcut
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert not torch.equal(before[f"{name}.weight"], m.weight), name
    assert model(x).shape == (4, 10)


def test_binary_and_fp_arms_differ_only_in_the_conv_class():
    binary = binary_resnet_small(PlainBinaryConv2d)
    fp = binary_resnet_small(None)
    convs = lambda m: [(n, type(c)) for n, c in m.named_modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    b, f = convs(binary), convs(fp)
    assert [n for n, _ in b] == [n for n, _ in f]
    # the stem stays full precision; all 16 block convolutions are binary in one arm, float in the other
    assert b[0] == ("conv1", nn.Conv2d) and f[0] == ("conv1", nn.Conv2d)
    assert len(b) == 17 and all(issubclass(t, BinaryConv2d) for _, t in b[1:])
    assert not any(issubclass(t, BinaryConv2d) for _, t in f)
    assert binary.widths == (16, 32, 64, 128)
    assert isinstance(binary.bn_fc, nn.BatchNorm1d)
    # no ReLU anywhere: a sign of a post-ReLU tensor would be all +1
    assert not any(isinstance(m, nn.ReLU) for m in binary.modules())


def test_every_binary_conv_has_a_shortcut():
    """Zeroing one block's BN output leaves the block's input flowing through (identity or pool+pad)."""
    model = binary_resnet_small(PlainBinaryConv2d, width_mult=0.25).eval()
    block = model.layer2[0]
    for bn in (block.bn1, block.bn2):
        nn.init.zeros_(bn.weight)
        nn.init.zeros_(bn.bias)
    x = torch.rand(2, 4, 8, 8) * 0.5  # inside hardtanh's linear range
    expected = PoolPadShortcut(4, 8, 2)(x)
    assert torch.allclose(block(x), expected)


@pytest.mark.parametrize("side", [28, 7])
def test_odd_sides_keep_shortcut_and_conv_shapes_equal(side):
    """28 -> 14 -> 7 -> 4: the shortcut of the last stride-2 block must give 4 rows, not 3 broadcast."""
    model = binary_resnet_small(PlainBinaryConv2d, width_mult=0.25).eval()
    shapes = []
    model.layer4[0].shortcut1.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    model.layer4[0].bn1.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    model(torch.randn(1, 1, side, side))
    assert shapes[0] == shapes[1]


def test_refuses_unknown_activation_and_conv():
    with pytest.raises(ValueError, match="act must be"):
        binary_resnet_small(None, act="relu")
    with pytest.raises(ValueError, match="BinaryConv2d subclass"):
        binary_resnet_small(nn.Conv2d)
