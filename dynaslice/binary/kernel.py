"""The 1-bit CPU kernel, from numpy: pack signs, pack weights, XNOR-popcount convolution.

The computation is in the C extension ``dynaslice.binary._bitconv`` (``csrc/bitconv.c``, built by
``pip install -e .``); this module fixes the layouts, checks shapes and dtypes, and picks the
path. It imports numpy and the extension only -- no torch -- so the binary runner
(:mod:`dynaslice.binary.packed`) runs where torch is not installed.

Layouts (NHWC, channels packed 64 to a word, bit ``c % 64`` of word ``c // 64`` set where the
value is ``>= 0``, i.e. :func:`dynaslice.binary.layers.binarize` gives ``+1``; bits past the channel
count are 0 in activations and weights alike, so they never count as a mismatch):

- activations: ``uint64 [N, H, W, ceil(C/64)]`` (:func:`pack_signs`);
- weights: ``uint64 [kh*kw*ceil(C/64), O rounded up to 16]``, output channels innermost so that
  one vector register holds one word of 8 filters (:func:`pack_weights`).

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


def supported_paths() -> list[str]:
    """The paths this CPU runs, fastest first."""
    names = {v: k for k, v in PATHS.items()}
    return [names[p] for p in _bitconv.supported_paths()]


def resolve_path(path: str | None = None) -> str:
    """``path``, else ``$DYNASLICE_BINARY_KERNEL``, else the fastest supported; refuses one the CPU lacks."""
    chosen = path or os.environ.get(PATH_ENV) or supported_paths()[0]
    if chosen not in PATHS:
        raise ValueError(f"unknown 1-bit kernel path {chosen!r} (from {PATH_ENV} or the caller): use one of {', '.join(PATHS)}")
    if chosen not in supported_paths():
        raise ValueError(f"this CPU cannot run the {chosen} path of the 1-bit kernel; it runs {', '.join(supported_paths())}")
    return chosen


def words(channels: int) -> int:
    """64-bit words per position for ``channels`` packed signs."""
    return (channels + 63) // 64


@dataclass(frozen=True)
class PackedConv:
    """A binary convolution's packed weights and geometry (see the module's layouts)."""

    bits: np.ndarray  # uint64 [kh*kw*words(cin), O rounded up to 16]
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int


def pack_weights(weight: np.ndarray, stride: int, padding: int) -> PackedConv:
    """``+-1`` weights ``[O, I, k, k]`` (any integer or float dtype) in the kernel's layout."""
    w = np.asarray(weight)
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"binary weights must be [out, in, k, k], got shape {w.shape}")
    if not np.isin(w, (-1, 1)).all():
        raise ValueError("binary weights must all be +1 or -1")
    o, i, k, _ = w.shape
    cw = words(i)
    signs = np.zeros((o, k, k, cw * 64), dtype=np.uint8)
    signs[..., :i] = (w > 0).transpose(0, 2, 3, 1)
    packed = np.packbits(signs, axis=-1, bitorder="little").view("<u8").reshape(o, k * k * cw)
    opad = -(-o // _OPAD) * _OPAD
    bits = np.zeros((k * k * cw, opad), dtype=np.uint64)
    bits[:, :o] = packed.T
    return PackedConv(np.ascontiguousarray(bits), i, o, k, int(stride), int(padding))


def unpack_weights(conv: PackedConv) -> np.ndarray:
    """The ``+-1`` int8 weights ``[O, I, k, k]`` back from :class:`PackedConv` (for checks and tests)."""
    k, cw = conv.kernel, words(conv.cin)
    raw = np.ascontiguousarray(conv.bits[:, : conv.cout].T).view(np.uint8)
    signs = np.unpackbits(raw.reshape(conv.cout, k, k, cw * 8), axis=-1, bitorder="little")[..., : conv.cin]
    return (signs.astype(np.int8) * 2 - 1).transpose(0, 3, 1, 2).copy()


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def pack_signs(x: np.ndarray, center: bool = False) -> np.ndarray:
    """Signs of float32 NHWC ``x`` (minus each sample's mean over H, W, C when ``center``), packed."""
    if x.ndim != 4:
        raise ValueError(f"activations must be NHWC, got shape {x.shape}")
    x = _f32(x)
    n, h, w, c = x.shape
    out = np.empty((n, h, w, words(c)), dtype=np.uint64)
    _bitconv.pack_signs(x, out, n, h * w, c, bool(center))
    return out


def _out_side(side: int, conv: PackedConv) -> int:
    return (side + 2 * conv.padding - conv.kernel) // conv.stride + 1


def _check_input(xp: np.ndarray, conv: PackedConv) -> tuple[int, int, int]:
    if xp.dtype != np.uint64 or xp.ndim != 4 or not xp.flags.c_contiguous:
        raise ValueError("packed activations must be a C-contiguous uint64 [N, H, W, words] array")
    n, h, w, cw = xp.shape
    if cw != words(conv.cin):
        raise ValueError(f"packed activations have {cw} words per position, the conv's {conv.cin} channels need {words(conv.cin)}")
    return n, h, w


def conv_counts(xp: np.ndarray, conv: PackedConv, path: str | None = None) -> np.ndarray:
    """The integer result of the binary convolution, ``int32 [N, Ho, Wo, O]``: the sum over valid
    taps and channels of ``(+-1) * (+-1)`` -- equal to the float conv of the signs with zero padding."""
    n, h, w = _check_input(xp, conv)
    out = np.empty((n, _out_side(h, conv), _out_side(w, conv), conv.cout), dtype=np.int32)
    _bitconv.conv(xp, conv.bits, out, n, h, w, conv.cin, conv.cout, conv.kernel, conv.kernel, conv.stride,
                  conv.padding, PATHS[resolve_path(path)])  # fmt: skip
    return out


def conv_fused(
    xp: np.ndarray,
    conv: PackedConv,
    a: np.ndarray,
    b: np.ndarray,
    residual: np.ndarray | None = None,
    act: str | None = None,
    slope: np.ndarray | None = None,
    path: str | None = None,
) -> np.ndarray:
    """``act(counts * a[o] + b[o] + residual)`` in float32 NHWC, in one pass: ``a`` is the binary
    scale times the folded BatchNorm's multiplier, ``b`` its shift, ``act`` hardtanh or PReLU."""
    n, h, w = _check_input(xp, conv)
    shape = (n, _out_side(h, conv), _out_side(w, conv), conv.cout)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {list(ACTIVATIONS)}, got {act!r}")
    if residual is not None and residual.shape != shape:
        raise ValueError(f"the residual has shape {residual.shape}, the convolution gives {shape}")
    out = np.empty(shape, dtype=np.float32)
    _bitconv.conv(xp, conv.bits, out, n, h, w, conv.cin, conv.cout, conv.kernel, conv.kernel, conv.stride,
                  conv.padding, PATHS[resolve_path(path)], _vec(a, conv.cout), _vec(b, conv.cout),
                  None if residual is None else _f32(residual), ACTIVATIONS[act],
                  None if slope is None else _vec(slope, conv.cout))  # fmt: skip
    return out


def _vec(v: np.ndarray, n: int) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
    if v.size != n:
        raise ValueError(f"a per-channel vector has {v.size} values for {n} channels")
    return v


def pool_pad(x: np.ndarray, stride: int, cout: int) -> np.ndarray:
    """``AvgPool2d(stride, ceil_mode=True)`` then zero channels up to ``cout``, float32 NHWC: the
    binary ResNet's downsampling shortcut (:class:`dynaslice.binary.models.PoolPadShortcut`)."""
    x = _f32(x)
    n, h, w, c = x.shape
    out = np.empty((n, -(-h // stride), -(-w // stride), cout), dtype=np.float32)
    _bitconv.pool_pad(x, out, n, h, w, c, stride, cout)
    return out
