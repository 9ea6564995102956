"""The 1-bit kernel's row-packed patches and padding bases (issue 30, the stride-1 speed work):
every shape family the kernel specialises (3x3 over 16, 32, 64 and 128 channels), the generic
ones around them (channels off a byte, a word and 64's multiples; 1x1 and 5x5 kernels; padding
0 to 2; strides 1 to 3; H != W; maps smaller than the kernel's reach), counted exactly as the
simulated convolution, and the fused layer giving the portable path's floats bit for bit on
every path (the AVX-512 path finishes rows of 16-filter blocks in registers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynaslice.binary import _bitconv, kernel
from dynaslice.binary.layers import binarize

torch.set_num_threads(1)
PATHS = kernel.supported_paths()

# (batch, cin, cout, height, width, kernel, stride, padding)
SHAPES = [
    (2, 16, 16, 9, 7, 3, 1, 1),  # the specialised 16-channel rows, O one vector block
    (1, 32, 48, 6, 5, 3, 1, 1),
    (2, 64, 32, 4, 5, 3, 1, 1),
    (1, 128, 16, 3, 4, 3, 1, 1),  # two words a position; a 3-row map is all edges
    (1, 16, 32, 5, 6, 3, 1, 2),  # two rows of padding around a 3x3 kernel
    (1, 24, 16, 10, 9, 3, 3, 1),  # stride 3, channels a byte multiple
    (2, 5, 16, 6, 6, 3, 1, 1),  # channels off a byte: the two-word read
    (1, 96, 17, 5, 4, 3, 2, 1),  # a word and a half per position, O not a block multiple
    (1, 16, 16, 2, 2, 3, 1, 1),  # a 2x2 map: every position misses a row and a column
    (1, 40, 32, 7, 6, 5, 1, 2),
    (1, 48, 16, 4, 4, 1, 1, 0),
]


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def layer_inputs(shape):
    n, cin, cout, h, w, k, stride, pad = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, cin, h, w, generator=gen)
    x[0, 0, 0, 0] = 0.0  # +1 in the contract
    signs = torch.where(torch.rand(cout, cin, k, k, generator=gen) < 0.5, -1.0, 1.0)
    return x, signs, kernel.pack_weights(signs.to(torch.int8).numpy(), stride, pad)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}c{}o{}h{}w{}k{}st{}p{}".format(*s))
def test_counts_equal_the_simulated_conv(path, shape):
    x, signs, conv = layer_inputs(shape)
    expected = F.conv2d(binarize(x), signs, stride=conv.stride, padding=conv.padding)
    np.testing.assert_array_equal(kernel.conv_counts(nhwc(x), conv, path=path), nhwc(expected).astype(np.int32))


@pytest.mark.parametrize("path", [p for p in PATHS if p != "portable"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}c{}o{}h{}w{}k{}st{}p{}".format(*s))
@pytest.mark.parametrize("act", ["hardtanh", "prelu"])
def test_fused_layer_floats_equal_the_portable_path(path, shape, act):
    x, _, conv = layer_inputs(shape)
    gen = torch.Generator().manual_seed(5)
    a, b, slope = (torch.randn(conv.cout, generator=gen).numpy() * 0.1 for _ in range(3))
    shortcut = "identity" if conv.stride == 1 and conv.cin == conv.cout and conv.kernel == 2 * conv.padding + 1 else None
    for center in (False, True):
        args = (nhwc(x), conv, a, b, act, slope, shortcut, center)
        np.testing.assert_array_equal(kernel.binary_layer(*args, path=path), kernel.binary_layer(*args, path="portable"))


def test_the_network_call_needs_no_packed_input_in_its_workspace():
    """The packed signs live in the kernel's own per-sample scratch now: the caller's workspace
    holds the two float activations only (it held the whole batch's packed input before)."""
    conv = kernel.pack_weights(np.ones((16, 16, 3, 3), dtype=np.int8), 1, 1)
    stem_w = np.zeros((3, 3, 1, 16), np.float32)
    ones16, cls = np.ones(16, np.float32), np.zeros((16, 10), np.float32)
    plan = ((0, stem_w, ones16, None, 1, 16, 3, 1, 1),
            (1, conv.bits, conv.tap_ones, ones16, ones16, None, 16, 16, 3, 1, 1, 0, 1),
            (2, cls, np.arange(10, dtype=np.float32), 16, 10))  # fmt: skip
    x, out = np.ones((2, 5, 5, 1), np.float32), np.zeros((2, 10), np.float32)
    workspace = np.zeros(2 * 4 * (2 * 5 * 5 * 16), np.uint8)  # two activations of the batch
    _bitconv.run(x, out, workspace, 2, 5, 5, 1, kernel.PATHS["portable"], kernel.ACTIVATIONS["hardtanh"], plan)
    np.testing.assert_array_equal(out, np.tile(np.arange(10, dtype=np.float32), (2, 1)))
