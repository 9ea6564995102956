"""The 1-bit kernel (issue 30 item 3): its integer counts equal the simulated binary conv's exactly,
on every path this CPU has; the fused epilogue, the shortcut, and a whole network match torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynaslice.binary import kernel
from dynaslice.binary.layers import PlainBinaryConv2d, binarize, center_per_sample

torch.set_num_threads(1)
PATHS = kernel.supported_paths()


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def random_signs(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0)


# (batch, cin, cout, side, kernel, stride, padding): channels off 64's multiples, across a word
# boundary and over two words, outputs not multiples of 16, odd sides, strides 1/2, padding 0/1
CASES = [
    (1, 3, 5, 7, 3, 1, 1),
    (2, 16, 16, 9, 3, 2, 1),
    (3, 63, 17, 6, 3, 1, 0),
    (1, 64, 32, 5, 3, 2, 0),
    (2, 65, 33, 8, 3, 2, 1),
    (1, 130, 7, 4, 3, 1, 1),
    (2, 20, 40, 5, 1, 2, 0),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}o{}s{}k{}st{}p{}".format(*c))
def test_counts_equal_the_simulated_conv(path, case):
    n, cin, cout, side, k, stride, pad = case
    gen = torch.Generator().manual_seed(sum(case))
    x = torch.randn(n, cin, side, side + 1, generator=gen)  # H != W
    w = random_signs(gen, cout, cin, k, k)
    expected = F.conv2d(binarize(x), w, stride=stride, padding=pad)  # zeros in the padding
    conv = kernel.pack_weights(w.to(torch.int8).numpy(), stride, pad)
    counts = kernel.conv_counts(kernel.pack_signs(nhwc(x)), conv, path=path)
    assert counts.dtype == np.int32
    np.testing.assert_array_equal(counts, nhwc(expected).astype(np.int32))


def test_every_supported_path_is_tested_and_forcing_works(monkeypatch):
    assert "portable" in PATHS
    monkeypatch.setenv(kernel.PATH_ENV, "portable")
    assert kernel.resolve_path() == "portable"
    monkeypatch.setenv(kernel.PATH_ENV, "sse9")
    with pytest.raises(ValueError, match="unknown 1-bit kernel path 'sse9'"):
        kernel.resolve_path()
    monkeypatch.delenv(kernel.PATH_ENV)
    assert kernel.resolve_path() == PATHS[0]


def test_pack_signs_matches_binarize_and_centring():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 70, 3, 4, generator=gen) + 0.5
    x[0, 0, 0, 0] = 0.0  # sign(0) is +1 in the contract
    x[0, 1, 0, 0] = -0.0
    for center, ref in ((False, x), (True, center_per_sample(x))):
        packed = kernel.pack_signs(nhwc(x), center=center)
        assert packed.shape == (2, 3, 4, 2)
        bits = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")[..., :70]
        np.testing.assert_array_equal(bits.astype(np.int8) * 2 - 1, nhwc(binarize(ref)))
        assert not np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")[..., 70:].any()


def test_weights_round_trip():
    gen = torch.Generator().manual_seed(2)
    w = random_signs(gen, 19, 67, 3, 3).to(torch.int8).numpy()
    np.testing.assert_array_equal(kernel.unpack_weights(kernel.pack_weights(w, 1, 1)), w)
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        kernel.pack_weights(np.zeros((2, 2, 3, 3)), 1, 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act", [None, "hardtanh", "prelu"])
def test_fused_epilogue(path, act):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 7, 7, generator=gen)
    w = random_signs(gen, 20, 24, 3, 3)
    a, b, slope = (torch.randn(20, generator=gen) * 0.1 for _ in range(3))
    counts = F.conv2d(binarize(x), w, stride=2, padding=1)
    res = torch.randn_like(counts)
    y = counts * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) + res
    y = {None: y, "hardtanh": F.hardtanh(y), "prelu": F.prelu(y, slope)}[act]
    conv = kernel.pack_weights(w.numpy(), 2, 1)
    got = kernel.conv_fused(kernel.pack_signs(nhwc(x)), conv, a.numpy(), b.numpy(), nhwc(res), act,
                            slope.numpy(), path=path)  # fmt: skip
    np.testing.assert_allclose(got, nhwc(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", [7, 8])
def test_pool_pad_matches_the_shortcut(side):
    from dynaslice.binary.models import PoolPadShortcut

    x = torch.randn(2, 6, side, side)
    expected = PoolPadShortcut(6, 10, 2)(x)
    np.testing.assert_allclose(kernel.pool_pad(nhwc(x), 2, 10), nhwc(expected), rtol=1e-6, atol=1e-6)


def test_refuses_mismatched_inputs():
    conv = kernel.pack_weights(np.ones((4, 70, 3, 3), dtype=np.int8), 1, 1)
    with pytest.raises(ValueError, match="70 channels need 2"):
        kernel.conv_counts(kernel.pack_signs(np.zeros((1, 5, 5, 10), np.float32)), conv)
    # the C side checks buffer lengths itself, so a caller that skips the wrapper cannot overrun
    from dynaslice.binary import _bitconv

    with pytest.raises(ValueError, match="bytes, the shape needs"):
        _bitconv.conv(np.zeros(3, np.uint64), conv.bits, np.zeros(10, np.int32), 1, 5, 5, 70, 4, 3, 3, 1, 1, 0)


def test_binary_layer_spec_runs_on_the_kernel():
    """A trained layer's deploy_spec through the kernel: counts * scale equals the layer's eval output."""
    torch.manual_seed(4)
    layer = PlainBinaryConv2d(12, 9, 3, stride=2, padding=1).eval()
    x = torch.randn(2, 12, 9, 9)
    spec = layer.deploy_spec()
    conv = kernel.pack_weights(spec.weight.numpy(), spec.stride, spec.padding)
    got = kernel.conv_fused(kernel.pack_signs(nhwc(x)), conv, spec.scale.numpy(), np.zeros(9, np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(got, nhwc(layer(x)), rtol=1e-5, atol=1e-6)
