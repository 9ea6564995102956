"""A compressed file for unstructured sparse weights: a bitmask of the non-zeros plus their values.

Unstructured sparsity (Lottery Jackpots, magnitude pruning) leaves the weight tensors dense with
exact zeros, so ``model.pt`` and ``model.onnx`` are as large as the dense network's. Here each
floating-point tensor of two or more dimensions (the conv and linear weights) is stored as one
bit per entry (``numpy.packbits`` of ``w != 0``) plus its non-zero values in their own dtype:
``numel / 8 + 4 * nnz`` bytes at float32 instead of ``4 * numel``, smaller as soon as more than
1/32 of the weights are zero. Everything else (biases, BatchNorm, counters) is stored as it is.

The file is a plain ``.npz`` (an uncompressed zip of ``.npy`` arrays, read without pickle); entry
``NAME|bitmask``, ``NAME|values`` and ``NAME|shape`` hold a sparse tensor, ``NAME`` a dense one.
:func:`load_sparse` rebuilds the state dict exactly (a ``-0.0`` weight comes back as ``0.0``).

Storage only: no sparse kernel runs from it. Loading gives dense tensors for torch/onnxruntime,
and no latency gain is claimed for unstructured sparsity at these sizes (docs/PRUNING.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path

__all__ = ["load_sparse", "save_sparse"]

_SEP = "|"  # never in a state dict's names (dots and identifiers)


def _sparse(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.ndim >= 2


def save_sparse(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> dict[str, Any]:
    """Write ``state`` (a state dict) to ``path`` in the bitmask + values format.

    Returns the sizes: ``bytes`` of the file, ``dense_float32_bytes`` (every entry as dense
    float32, the reference a dense float32 file pays for the same tensors), ``nonzero`` and
    ``entries`` (the numbers stored sparse).
    """
    arrays: dict[str, np.ndarray] = {}
    dense_bytes = nonzero = 0
    for name, tensor in state.items():
        if _SEP in name:
            raise ValueError(f"state dict entry {name!r} contains {_SEP!r}; the sparse file can't name it")
        t = tensor.detach().cpu()
        dense_bytes += 4 * t.numel()
        try:
            a = t.numpy()
        except TypeError as e:  # bfloat16 and other dtypes numpy lacks
            raise ValueError(f"{name}: the sparse file stores numpy dtypes, not {t.dtype} ({e})") from None
        if _sparse(t):
            keep = a != 0
            arrays[f"{name}{_SEP}bitmask"] = np.packbits(keep.ravel())
            arrays[f"{name}{_SEP}values"] = a[keep]
            arrays[f"{name}{_SEP}shape"] = np.asarray(a.shape, dtype=np.int64)
            nonzero += int(keep.sum())
        else:
            arrays[name] = a
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return {"path": str(path), "bytes": path.stat().st_size, "dense_float32_bytes": dense_bytes,
            "nonzero": nonzero}  # fmt: skip


def load_sparse(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict written by :func:`save_sparse`, dense again (entries in the file's order)."""
    out: dict[str, torch.Tensor] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                name, _, part = key.partition(_SEP)
                if not part:
                    out[name] = torch.from_numpy(npz[key].copy())
                elif part == "shape":
                    shape = tuple(int(s) for s in npz[key])
                    numel = int(np.prod(shape))
                    keep = np.unpackbits(npz[f"{name}{_SEP}bitmask"], count=numel).astype(bool)
                    values = npz[f"{name}{_SEP}values"]
                    dense = np.zeros(numel, dtype=values.dtype)
                    dense[keep] = values
                    out[name] = torch.from_numpy(dense.reshape(shape))
    except (KeyError, ValueError, EOFError) as e:  # a damaged or foreign file: one line, not a traceback
        raise ValueError(f"{path} is not a readable sparse weights file ({e})") from None
    return out
