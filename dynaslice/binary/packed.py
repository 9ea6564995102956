"""A trained binary network as a deployable package, and its runner on the 1-bit kernel.

Package (a folder, ``format`` ``dynaslice-binary``, ``format_version`` 1)::

    manifest.json         input shape, activation, the layers in order (strides, padding, centring,
                          shortcut kind, tensor names), and the sizes of the three forms
    weights.safetensors   packed sign bits (uint64) of every binary conv, its fused per-channel
                          affine (binary scale x folded BatchNorm), PReLU slopes, and the float
                          layers: the stem conv with its BatchNorm folded in, the classifier with
                          the BatchNorm1d before it folded in

:func:`export_binary` writes it from a :class:`~dynaslice.binary.models.BinaryResNet` (every conv
after the stem binary). :class:`BinaryRunner` runs it on the kernel (:mod:`dynaslice.binary.kernel`)
in one C call per batch: the float stem, each binary layer (signs packed, XNOR-popcount,
``act(count*a + b + shortcut)`` in one pass), the pooled classifier, one sample at a time in NHWC.
The runner computes with numpy and the kernel only, no torch call (torch is needed to export);
importing it through the ``dynaslice`` package still loads torch, whose ``__init__`` imports it,
as for :mod:`dynaslice.onnx_package`. Every file is read by the package rule
(:func:`dynaslice.onnx_package.read_package_file`) and the manifest is checked against the
weights before anything runs, so a damaged package is one ``ValueError``.

Sizes: ``binary_bytes`` is the weights file; ``float32_bytes`` the same network's parameters
and BatchNorm statistics in float32; ``int8_bytes`` its conv and linear weights in int8 with a
float32 scale per output channel, the rest float32 (what the int8 ONNX graph stores).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from ..onnx_package import MANIFEST, package_file, read_package_file
from . import _bitconv, kernel

BINARY_FORMAT = "dynaslice-binary"
BINARY_FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
MAX_WEIGHTS_BYTES = 1 << 30
MAX_MANIFEST_BYTES = 1 << 20
MAX_LAYERS = 4096
_ACTS = ("hardtanh", "prelu")


def is_binary_package(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a manifest of this format (read by the package rule)."""
    try:
        manifest = json.loads(read_package_file(directory, MANIFEST, MAX_MANIFEST_BYTES))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == BINARY_FORMAT


# ---------------------------------------------------------------------------------------------
# export (needs torch)


def export_binary(model: Any, directory: str | os.PathLike, input_size: tuple[int, int, int] = (1, 28, 28)) -> dict:
    """Write ``model`` (a :class:`~dynaslice.binary.models.BinaryResNet` with binary convs, in
    eval) as a package in ``directory``; returns the manifest (with the sizes)."""
    import torch

    from ..atomic import atomic_dir
    from .layers import BinaryConv2d
    from .models import BinaryResNet, PoolPadShortcut

    if not isinstance(model, BinaryResNet):
        raise ValueError(f"export_binary takes a BinaryResNet (dynaslice.binary.models), got {type(model).__name__}")
    blocks = [b for stage in model.stages() for b in stage]
    convs = [c for b in blocks for c in (b.conv1, b.conv2)]
    if not all(isinstance(c, BinaryConv2d) for c in convs):
        raise ValueError("this network's block convolutions are full precision (conv=None): it has no 1-bit form")
    _check_target(Path(directory))
    tensors: dict[str, np.ndarray] = {}
    act = model.act_name

    def bn_fold(bn: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        mul = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return mul, bn.bias - bn.running_mean * mul

    def put(name: str, t: torch.Tensor | np.ndarray, dtype: Any = np.float32) -> str:
        arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
        tensors[name] = np.ascontiguousarray(arr, dtype=dtype)
        return name

    def slope(a: torch.nn.Module) -> torch.Tensor | None:
        return a.weight if isinstance(a, torch.nn.PReLU) else None

    layers: list[dict] = []
    with torch.no_grad():
        mul, shift = bn_fold(model.bn1)
        stem = model.conv1
        layers.append({
            "kind": "stem", "cin": stem.in_channels, "cout": stem.out_channels, "kernel": stem.kernel_size[0],
            "stride": stem.stride[0], "padding": stem.padding[0],
            "weight": put("stem.weight", stem.weight * mul.view(-1, 1, 1, 1)), "bias": put("stem.bias", shift),
            "slope": None if slope(model.act1) is None else put("stem.slope", slope(model.act1)),
        })  # fmt: skip
        for i, b in enumerate(blocks):
            for j, (conv, bn, actm, shortcut) in enumerate(
                ((b.conv1, b.bn1, b.act1, b.shortcut1), (b.conv2, b.bn2, b.act2, None))
            ):
                spec = conv.deploy_spec()
                packed = kernel.pack_weights(spec.weight.numpy(), spec.stride, spec.padding)
                mul, shift = bn_fold(bn)
                name = f"block{i}.conv{j + 1}"
                sc: dict = {"kind": "identity"}
                if isinstance(shortcut, PoolPadShortcut):
                    sc = {"kind": "pool_pad", "stride": shortcut.stride, "cout": shortcut.cout}
                layers.append({
                    "kind": "binary_conv", "cin": packed.cin, "cout": packed.cout, "kernel": packed.kernel,
                    "stride": packed.stride, "padding": packed.padding, "center": spec.center, "shortcut": sc,
                    "bits": put(f"{name}.bits", packed.bits, np.uint64),
                    "a": put(f"{name}.a", spec.scale * mul), "b": put(f"{name}.b", shift),
                    "slope": None if slope(actm) is None else put(f"{name}.slope", slope(actm)),
                })  # fmt: skip
        mul, shift = bn_fold(model.bn_fc)
        fc = model.fc
        layers.append({
            "kind": "classifier", "cin": fc.in_features, "cout": fc.out_features,
            "weight": put("fc.weight", fc.weight * mul.view(1, -1)), "bias": put("fc.bias", fc.bias + fc.weight @ shift),
        })  # fmt: skip
    data = save_safetensors(tensors)
    manifest = {
        "format": BINARY_FORMAT,
        "format_version": BINARY_FORMAT_VERSION,
        "input": {"shape": [None, *map(int, input_size)], "dtype": "float32"},
        "num_classes": fc.out_features,
        "activation": act,
        "weights": WEIGHTS,
        "layers": layers,
        "sizes": _sizes(model, data),
    }
    with atomic_dir(directory) as tmp:
        package_file(tmp, WEIGHTS, exists=False).write_bytes(data)
        package_file(tmp, MANIFEST, exists=False).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _sizes(model: Any, weights_file: bytes) -> dict:
    """The three forms' bytes (see the module docstring) and the ratios to the binary file."""
    import torch

    state = [t for t in model.state_dict().values() if t.is_floating_point()]
    fp32 = sum(t.numel() for t in state) * 4
    heavy = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    heavy_n = sum(w.numel() for w in heavy)
    int8 = heavy_n + 4 * sum(w.shape[0] for w in heavy) + (fp32 - 4 * heavy_n)
    binary = len(weights_file)
    return {
        "binary_bytes": binary,
        "float32_bytes": fp32,
        "int8_bytes": int8,
        "float32_over_binary": round(fp32 / binary, 2),
        "int8_over_binary": round(int8 / binary, 2),
    }


def _check_target(directory: Path) -> None:
    """Refuse to replace a folder that holds anything but a binary package (nothing is lost)."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise FileExistsError(f"{directory} is a file or a link; give a new folder for the binary package")
    if directory.is_dir():
        present = set(os.listdir(directory))
        if present and not (present <= {MANIFEST, WEIGHTS} and is_binary_package(directory)):
            raise FileExistsError(f"{directory} exists and is not a binary package; choose a new directory or remove it")


# ---------------------------------------------------------------------------------------------
# running (numpy and the kernel only)


@dataclass(frozen=True)
class _Layer:
    kind: str  # stem, binary_conv, classifier
    conv: kernel.PackedConv | kernel.FloatConv | None
    a: np.ndarray | None  # binary: the fused affine; classifier: weight [C, classes]
    b: np.ndarray | None  # binary: its shift; classifier: bias
    slope: np.ndarray | None
    center: bool = False
    shortcut: str | None = None


class BinaryRunner:
    """A binary package on the 1-bit kernel: ``runner(x)`` maps float32 ``[B, C, H, W]`` to logits.

    ``path`` forces a kernel path (``avx512``, ``avx2``, ``portable``; default: the fastest the
    CPU has, or ``$DYNASLICE_BINARY_KERNEL``)."""

    def __init__(self, directory: str | os.PathLike, path: str | None = None):
        self.directory = Path(directory)
        self.path = kernel.resolve_path(path)
        where = self.directory / MANIFEST
        try:
            m = json.loads(read_package_file(self.directory, MANIFEST, MAX_MANIFEST_BYTES).decode("utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where} not found: {self.directory} is not a binary package") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{where} is not valid JSON ({type(e).__name__}); re-export the package") from None
        try:
            self._load(m)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"{where} is damaged ({type(e).__name__}: {e}); re-export the package") from None

    def _load(self, m: dict) -> None:
        where = self.directory / MANIFEST
        if m.get("format") != BINARY_FORMAT or m.get("format_version") != BINARY_FORMAT_VERSION:
            raise ValueError(f"{where} is not a {BINARY_FORMAT!r} manifest of version {BINARY_FORMAT_VERSION}")
        shape = m["input"]["shape"]
        if not (len(shape) == 4 and shape[0] is None and all(isinstance(s, int) and s > 0 for s in shape[1:])):
            raise ValueError(f"{where} is damaged: input.shape {shape} is not [null, C, H, W]")
        self.input_shape = tuple(shape[1:])
        self.act = m["activation"]
        if self.act not in _ACTS:
            raise ValueError(f"{where} is damaged: activation {self.act!r} is not one of {_ACTS}")
        self.num_classes = int(m["num_classes"])
        self.manifest = m
        data = read_package_file(self.directory, m["weights"], MAX_WEIGHTS_BYTES)
        try:
            weights = load_safetensors(data)
        except Exception as e:  # safetensors' own error type is no ValueError
            raise ValueError(f"{self.directory / m['weights']} is not a readable safetensors file ({e}); re-export the package") from None
        specs = m["layers"]
        if not (isinstance(specs, list) and 2 <= len(specs) <= MAX_LAYERS):
            raise ValueError(f"{where} is damaged: 'layers' is not a list of 2 to {MAX_LAYERS} layers")
        if specs[0]["kind"] != "stem" or specs[-1]["kind"] != "classifier":
            raise ValueError(f"{where} is damaged: the layers do not run from a stem to a classifier")

        def tensor(name: Any, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
            t = weights.get(name) if isinstance(name, str) else None
            if t is None or t.shape != shape or t.dtype != dtype:
                got = None if t is None else (t.shape, str(t.dtype))
                raise ValueError(f"{where} is damaged: tensor {name!r} is {got}, the manifest needs {shape} {np.dtype(dtype)}")
            return t

        def slope_of(s: dict, c: int) -> np.ndarray | None:
            if self.act == "prelu":
                return tensor(s["slope"], (c,))
            return None

        layers, channels = [], self.input_shape[0]
        for i, s in enumerate(specs):
            cin, cout = int(s["cin"]), int(s["cout"])
            if cin != channels or cout < 1:
                raise ValueError(f"{where} is damaged: layer {i} takes {cin} channels, it is given {channels}")
            if s["kind"] == "stem" and i == 0:
                k, st, pad = int(s["kernel"]), int(s["stride"]), int(s["padding"])
                if st < 1 or not 0 <= pad < k:
                    raise ValueError(f"{where} is damaged: the stem's stride {st} or padding {pad} is impossible")
                stem = kernel.prepare_float_conv(tensor(s["weight"], (cout, cin, k, k)), tensor(s["bias"], (cout,)), st, pad)
                layers.append(_Layer("stem", stem, None, None, slope_of(s, cout)))
            elif s["kind"] == "binary_conv" and 0 < i < len(specs) - 1:
                k, st, pad = int(s["kernel"]), int(s["stride"]), int(s["padding"])
                bits = tensor(s["bits"], (kernel.patch_words(cin, k), -(-cout // 16) * 16), np.uint64)
                conv = kernel.packed_conv(bits, cin, cout, k, st, pad)
                sc = s["shortcut"]
                if sc["kind"] == "identity" and st == 1 and cin == cout and pad == k // 2:
                    shortcut = "identity"
                elif sc["kind"] == "pool_pad" and int(sc["stride"]) == st and int(sc["cout"]) == cout >= cin and pad == k // 2:
                    shortcut = "pool"
                else:
                    raise ValueError(f"{where} is damaged: layer {i}'s shortcut {sc} does not fit the conv")
                layers.append(_Layer("binary_conv", conv, tensor(s["a"], (cout,)), tensor(s["b"], (cout,)),
                                     slope_of(s, cout), bool(s["center"]), shortcut))  # fmt: skip
            elif s["kind"] == "classifier" and i == len(specs) - 1:
                if cout != self.num_classes:
                    raise ValueError(f"{where} is damaged: the classifier has {cout} outputs for {self.num_classes} classes")
                w = tensor(s["weight"], (cout, cin))
                layers.append(_Layer("classifier", None, np.ascontiguousarray(w.T), tensor(s["bias"], (cout,)), None))
            else:
                raise ValueError(f"{where} is damaged: layer {i} of kind {s['kind']!r} is out of place")
            channels = cout
        self.layers = layers
        self._plan = tuple(_plan_entry(layer) for layer in layers)
        self._workspace = np.zeros(0, dtype=np.uint8)
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits of float ``x [B, C, H, W]``. The network is convolutional with a global pool, so any
        ``H, W`` runs; the manifest's ``input.shape`` is the size it was trained on."""
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1] != self.input_shape[0] or min(x.shape[2:]) < 1:
            raise ValueError(f"the binary package takes [B, {self.input_shape[0]}, H, W], got {list(x.shape)}")
        h = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)  # NHWC throughout
        out = np.empty((len(h), self.num_classes), dtype=np.float32)
        if len(h):
            _bitconv.run(h, out, self._workspace_for(*h.shape[:3]), *h.shape, kernel.PATHS[self.path],
                         kernel.ACTIVATIONS[self.act], self._plan)  # fmt: skip
        return out

    def _workspace_for(self, batch: int, height: int, width: int) -> np.ndarray:
        """Scratch for a call: two activations and the packed signs of the largest layer. Kept and
        reused (grown when a larger call comes), like onnxruntime's arena: fresh pages cost a fault
        each, which at batch 64 took longer than the layers themselves."""
        if (height, width) not in self._sizes:
            self._sizes[height, width] = _per_sample_sizes((height, width), self.layers)
        floats, words = self._sizes[height, width]
        need = batch * (2 * 4 * floats + 8 * words) + 64  # two float activations, the packed words
        if self._workspace.nbytes < need:
            self._workspace = np.zeros(need, dtype=np.uint8)
        return self._workspace

    def run_by_layer(self, x: np.ndarray) -> np.ndarray:
        """The same as a call, one kernel call per layer from Python (to time or inspect layers)."""
        h = np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1), dtype=np.float32)
        for layer in self.layers:
            if layer.kind == "stem":
                h = kernel.float_conv(h, layer.conv, self.act, layer.slope, self.path)  # type: ignore[arg-type]
            elif layer.kind == "binary_conv":
                h = kernel.binary_layer(h, layer.conv, layer.a, layer.b, self.act, layer.slope,  # type: ignore[arg-type]
                                        layer.shortcut, layer.center, self.path)  # fmt: skip
            else:
                h = h.mean(axis=(1, 2)) @ layer.a + layer.b
        return h


def _plan_entry(layer: _Layer) -> tuple:
    """One layer as :func:`_bitconv.run` takes it (see csrc/bitconv.c)."""
    c = layer.conv
    if layer.kind == "stem":
        assert isinstance(c, kernel.FloatConv)
        return (0, c.weight, c.bias, layer.slope, c.cin, c.cout, c.kernel, c.stride, c.padding)
    if layer.kind == "binary_conv":
        assert isinstance(c, kernel.PackedConv)
        return (1, c.bits, c.tap_ones, layer.a, layer.b, layer.slope, c.cin, c.cout, c.kernel, c.stride, c.padding,
                int(layer.center), kernel.SHORTCUTS[layer.shortcut])  # fmt: skip
    assert layer.a is not None and layer.b is not None
    return (2, layer.a, layer.b, layer.a.shape[0], layer.a.shape[1])


def _per_sample_sizes(side: tuple[int, int], layers: list[_Layer]) -> tuple[int, int]:
    """Per sample of ``side = (H, W)``: the floats of the largest activation, the words of the largest packed input."""
    h, w = side
    floats = words = 0
    for layer in layers:
        c = layer.conv
        if c is None:
            continue
        if isinstance(c, kernel.PackedConv):
            words = max(words, h * w * kernel.words(c.cin))
        h = (h + 2 * c.padding - c.kernel) // c.stride + 1
        w = (w + 2 * c.padding - c.kernel) // c.stride + 1
        floats = max(floats, h * w * c.cout)
    return floats, words
