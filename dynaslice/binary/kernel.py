"""The 1-bit CPU kernel, from numpy: XNOR-popcount convolution of bit-packed signs.

One call runs one binary layer of the network (:func:`binary_layer`): the signs of its float32
NHWC input are packed, convolved with the packed weights by XNOR-popcount, and the integer counts
go through the layer's per-channel affine (binary scale x folded BatchNorm), its shortcut and its
activation in the same pass -- the float stream between layers is read and written once per
layer, and a call costs one Python-to-C crossing. :func:`conv_counts` gives the integer counts
alone (the tests compare them with the simulated conv), :func:`float_conv` runs the
full-precision stem without a BLAS (so "one thread" is one thread). A whole network runs in one
call of ``_bitconv.run`` (:class:`dynaslice.binary.packed.BinaryRunner`), the same C functions.

The computation is in the C extension ``dynaslice.binary._bitconv`` (``csrc/bitconv.c``, built by
``pip install -e .``); this module fixes the layouts, checks shapes and dtypes, and picks the
path. It uses numpy and the extension only -- no torch, and the extension needs no torch headers
to build -- so the binary runner (:mod:`dynaslice.binary.packed`) makes no torch call.

Layouts (NHWC, channels packed 64 to a word, bit ``c % 64`` of word ``c // 64`` set where the
value is ``>= 0``, i.e. :func:`dynaslice.binary.layers.binarize` gives ``+1``; bits past the channel
count are 0 in activations and weights alike, so they never count as a mismatch):

- activations: ``uint64 [N, H, W, ceil(C/64)]`` (:func:`pack_signs`; packed inside each call);
- weights: bit-packed im2col order, bit ``t * C + c`` for tap ``t = i * k + j`` (so 9 taps of 16
  channels fill 3 words, not 9), ``uint64 [ceil(k*k*C/64), O rounded up to 16]``, output channels
  innermost so that one vector register holds one word of 8 filters (:func:`pack_weights`); the
  input's patches are built in the same order inside the call, from each sample's signs packed
  into rows with the zero padding in place, so a kernel row's taps are one run of bits
  (``csrc/bitconv.c``).

Paths: ``avx512`` (VPOPCNTDQ), ``avx2`` (nibble lookup), ``portable`` (C). The fastest the CPU
supports is used (``__builtin_cpu_supports``); ``DYNASLICE_BINARY_KERNEL=<path>`` or a ``path``
argument forces one, and a path the CPU lacks is refused rather than replaced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import _bitconv

PATHS = {"portable": 0, "avx2": 1, "avx512": 2}
PATH_ENV = "DYNASLICE_BINARY_KERNEL"
ACTIVATIONS = {None: 0, "hardtanh": 1, "prelu": 2}
_OPAD = 16
_SUPPORTED = tuple({v: k for k, v in PATHS.items()}[p] for p in _bitconv.supported_paths())


def supported_paths() -> list[str]:
    """The paths this CPU runs, fastest first."""
    return list(_SUPPORTED)


def resolve_path(path: str | None = None) -> str:
    """``path``, else ``$DYNASLICE_BINARY_KERNEL``, else the fastest supported; refuses one the CPU lacks."""
    chosen = path or os.environ.get(PATH_ENV) or supported_paths()[0]
    if chosen not in PATHS:
        raise ValueError(f"unknown 1-bit kernel path {chosen!r} (from {PATH_ENV} or the caller): use one of {', '.join(PATHS)}")
    if chosen not in _SUPPORTED:
        raise ValueError(f"this CPU cannot run the {chosen} path of the 1-bit kernel; it runs {', '.join(supported_paths())}")
    return chosen


def words(channels: int) -> int:
    """64-bit words per position for ``channels`` packed signs."""
    return (channels + 63) // 64


def patch_words(cin: int, k: int) -> int:
    """64-bit words of one bit-packed ``k x k x cin`` patch (bit ``t * cin + c``, tap ``t = i * k + j``)."""
    return (k * k * cin + 63) // 64


@dataclass(frozen=True)
class PackedConv:
    """A binary convolution's packed weights and geometry (see the module's layouts)."""

    bits: np.ndarray  # uint64 [patch_words(cin, k), O rounded up to 16]
    tap_ones: np.ndarray  # int32 [k*k, O]: the +1 weights of each tap (what a padded tap mismatches)
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int


def packed_conv(bits: np.ndarray, cin: int, cout: int, kernel: int, stride: int, padding: int) -> PackedConv:
    """:class:`PackedConv` from its packed bits (as stored in a package), checked and completed."""
    opad = -(-cout // _OPAD) * _OPAD
    shape = (patch_words(cin, kernel), opad)
    if bits.dtype != np.uint64 or bits.shape != shape:
        raise ValueError(f"packed weights are {bits.dtype} {bits.shape}, a {cin}->{cout} conv of kernel {kernel} needs uint64 {shape}")
    signs = _unpack(bits, cin, cout, kernel)
    tap_ones = np.ascontiguousarray(signs.reshape(cout, kernel * kernel, cin).sum(axis=2, dtype=np.int32).T)
    return PackedConv(np.ascontiguousarray(bits), tap_ones, cin, cout, kernel, int(stride), int(padding))


def pack_weights(weight: np.ndarray, stride: int, padding: int) -> PackedConv:
    """``+-1`` weights ``[O, I, k, k]`` (any integer or float dtype) in the kernel's layout."""
    w = np.asarray(weight)
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"binary weights must be [out, in, k, k], got shape {w.shape}")
    if not np.isin(w, (-1, 1)).all():
        raise ValueError("binary weights must all be +1 or -1")
    o, i, k, _ = w.shape
    kw = patch_words(i, k)
    signs = np.zeros((o, kw * 64), dtype=np.uint8)
    signs[:, : k * k * i] = (w > 0).transpose(0, 2, 3, 1).reshape(o, -1)  # bit t * cin + c
    packed = np.packbits(signs, axis=-1, bitorder="little").view("<u8").reshape(o, kw)
    bits = np.zeros((kw, -(-o // _OPAD) * _OPAD), dtype=np.uint64)
    bits[:, :o] = packed.T
    return packed_conv(bits, i, o, k, stride, padding)


def _unpack(bits: np.ndarray, cin: int, cout: int, k: int) -> np.ndarray:
    """The 0/1 signs ``[O, k, k, I]`` of packed bits."""
    raw = np.ascontiguousarray(bits[:, :cout].T).view(np.uint8)
    return np.unpackbits(raw, axis=-1, bitorder="little")[:, : k * k * cin].reshape(cout, k, k, cin)


def unpack_weights(conv: PackedConv) -> np.ndarray:
    """The ``+-1`` int8 weights ``[O, I, k, k]`` back from :class:`PackedConv` (for checks and tests)."""
    signs = _unpack(conv.bits, conv.cin, conv.cout, conv.kernel)
    return (signs.astype(np.int8) * 2 - 1).transpose(0, 3, 1, 2).copy()


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _nhwc(x: np.ndarray, channels: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    if x.ndim != 4 or x.shape[3] != channels:
        raise ValueError(f"the layer takes float32 NHWC with {channels} channels, got shape {list(x.shape)}")
    return _f32(x), x.shape


def pack_signs(x: np.ndarray, center: bool = False, path: str | None = None) -> np.ndarray:
    """Signs of float32 NHWC ``x`` (minus each sample's mean over H, W, C when ``center``), packed."""
    if x.ndim != 4:
        raise ValueError(f"activations must be NHWC, got shape {x.shape}")
    x = _f32(x)
    n, h, w, c = x.shape
    out = np.empty((n, h, w, words(c)), dtype=np.uint64)
    _bitconv.pack_signs(x, out, n, h * w, c, bool(center), PATHS[resolve_path(path)])
    return out


def _out_side(side: int, k: int, stride: int, padding: int) -> int:
    return (side + 2 * padding - k) // stride + 1


def conv_counts(x: np.ndarray, conv: PackedConv, center: bool = False, path: str | None = None) -> np.ndarray:
    """The integer result of the binary convolution of float32 NHWC ``x``'s signs, ``int32
    [N, Ho, Wo, O]``: the sum over valid taps and channels of ``(+-1) * (+-1)`` -- equal to the
    float conv of the signs with zero padding."""
    x, (n, h, w, _) = _nhwc(x, conv.cin)
    k, st, p = conv.kernel, conv.stride, conv.padding
    out = np.empty((n, _out_side(h, k, st, p), _out_side(w, k, st, p), conv.cout), dtype=np.int32)
    _bitconv.conv(x, conv.bits, conv.tap_ones, out, n, h, w, conv.cin, conv.cout, k, st, p, PATHS[resolve_path(path)],
                  center)  # fmt: skip
    return out


SHORTCUTS = {None: 0, "identity": 1, "pool": 2}


def binary_layer(
    x: np.ndarray,
    conv: PackedConv,
    a: np.ndarray,
    b: np.ndarray,
    act: str | None = None,
    slope: np.ndarray | None = None,
    shortcut: str | None = None,
    center: bool = False,
    path: str | None = None,
) -> np.ndarray:
    """One binary layer of the network in one call, float32 NHWC in and out:
    ``act(counts * a[o] + b[o] + shortcut(x))``, the counts of ``x``'s signs (centred per sample
    when ``center``). ``a`` is the binary scale times the folded BatchNorm's multiplier, ``b`` its
    shift; ``shortcut`` ``"identity"``, ``"pool"`` (``AvgPool2d(stride, ceil_mode=True)`` then zero
    channels: :class:`dynaslice.binary.models.PoolPadShortcut`) or None; ``act`` hardtanh, PReLU
    (``slope`` per channel) or None."""
    x, (n, h, w, _) = _nhwc(x, conv.cin)
    if act not in ACTIVATIONS or shortcut not in SHORTCUTS:
        raise ValueError(f"act must be one of {list(ACTIVATIONS)} and shortcut one of {list(SHORTCUTS)}")
    k, st, p = conv.kernel, conv.stride, conv.padding
    out = np.empty((n, _out_side(h, k, st, p), _out_side(w, k, st, p), conv.cout), dtype=np.float32)
    _bitconv.conv(x, conv.bits, conv.tap_ones, out, n, h, w, conv.cin, conv.cout, k, st, p, PATHS[resolve_path(path)],
                  center, _vec(a, conv.cout), _vec(b, conv.cout), ACTIVATIONS[act],
                  None if slope is None else _vec(slope, conv.cout), SHORTCUTS[shortcut])  # fmt: skip
    return out


def _vec(v: np.ndarray, n: int) -> np.ndarray:
    if not (isinstance(v, np.ndarray) and v.dtype == np.float32 and v.ndim == 1 and v.flags.c_contiguous):
        v = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
    if v.size != n:
        raise ValueError(f"a per-channel vector has {v.size} values for {n} channels")
    return v


@dataclass(frozen=True)
class FloatConv:
    """A full-precision conv (the stem) in the kernel's layout: ``weight [k, k, cin, cout rounded up
    to 16]`` (zeros past ``cout``: the kernel keeps 16 output channels in one accumulator)."""

    weight: np.ndarray
    bias: np.ndarray
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int


def prepare_float_conv(weight: np.ndarray, bias: np.ndarray, stride: int, padding: int) -> FloatConv:
    """A float conv ``[O, I, k, k]`` with its bias (the folded BatchNorm) in the kernel's layout."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"conv weights must be [out, in, k, k], got shape {w.shape}")
    o, i, k, _ = w.shape
    padded = np.zeros((k, k, i, -(-o // _OPAD) * _OPAD), dtype=np.float32)
    padded[..., :o] = w.transpose(2, 3, 1, 0)
    return FloatConv(padded, _vec(bias, o), i, o, k, int(stride), int(padding))


def float_conv(
    x: np.ndarray, conv: FloatConv, act: str | None = None, slope: np.ndarray | None = None, path: str | None = None
) -> np.ndarray:
    """``act(conv(x) + bias)`` for float32 NHWC ``x`` (zero padding), one thread, no BLAS."""
    x, (n, h, w, _) = _nhwc(x, conv.cin)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {list(ACTIVATIONS)}, got {act!r}")
    k, st, p = conv.kernel, conv.stride, conv.padding
    out = np.empty((n, _out_side(h, k, st, p), _out_side(w, k, st, p), conv.cout), dtype=np.float32)
    _bitconv.float_conv(x, conv.weight, conv.bias, out, n, h, w, conv.cin, conv.cout, k, st, p, PATHS[resolve_path(path)],
                        ACTIVATIONS[act],
                        None if slope is None else _vec(slope, conv.cout))  # fmt: skip
    return out
