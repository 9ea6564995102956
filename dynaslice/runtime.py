"""Run exported dynaslice models with onnxruntime and numpy only.

This file imports nothing from torch or from the rest of dynaslice (only the standard library,
``numpy`` and, when a model is loaded, ``onnxruntime``), so a deployment target that has no
torch can copy it alone and import it as a plain module. (``import dynaslice.runtime`` runs the
package's ``__init__``, which does import torch.)

- :class:`OnnxModel` runs one static subnet written by ``dynaslice.onnx_export.export_onnx``.
- :class:`GatedOnnxRunner` runs a gated (DS-Net) model package written by
  ``dynaslice.onnx_export.export_gated``: the trunk and gate once on the whole batch, then the
  samples grouped by the argmax route, each group through its route's dense subnet, outputs put
  back in input order -- the same computation as ``dynaslice.dynamic.DynamicNet``.
- :class:`BudgetOnnxRunner` runs a PSS budget-table package written by
  ``dynaslice.onnx_export.export_budget``: ``runner(x, max_macs=...)`` runs the most accurate
  entry within the budget, as ``dynaslice.budget.BudgetNet`` does (:func:`pick_entry`).

Package layouts (``manifest.json``, ``format_version`` 1)::

    gated:   manifest.json   format, input shape/dtype/normalisation, cut, routes (arch, MACs, file)
             trunk.onnx      input -> (features, logits): stem, stages before the cut, the gate
             route_{i}.onnx  features -> logits: route i's stages after the cut and the head
    budget:  manifest.json   format, input, entries (bucket, arch, MACs, val accuracy, latency, file)
             entry_{i}.onnx  input -> logits: entry i's subnet with the BN statistics it was selected with
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "dynaslice-gated-onnx"
BUDGET_FORMAT = "dynaslice-budget-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def _session(path: Path, providers: Sequence[str] | None) -> Any:
    """An onnxruntime session for ``path``, with errors that say which file is wrong and what to do."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(
            "running ONNX models needs onnxruntime: pip install onnxruntime (or 'dynaslice[onnx]')"
        ) from e
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} is missing; re-export it with dynaslice.onnx_export")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: optimizer notes are not the user's business
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except (
        Exception
    ) as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) derive from Exception
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"could not load ONNX model {path} ({reason}); if the file is truncated or damaged, "
            "re-export it with dynaslice.onnx_export"
        ) from e


def _check_input(x: Any, shape: Sequence[int | None], dtype: type, what: str) -> np.ndarray:
    """``x`` as a contiguous array of ``dtype``, checked against ``shape`` (``None``: any size)."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{what} takes a numeric array, got dtype {x.dtype}")
    want = "[" + ", ".join("batch" if s is None else str(s) for s in shape) + "]"
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape, strict=False)):
        raise ValueError(
            f"{what} expects input of shape {want}, got {list(x.shape)}; resize or reshape the input"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{what} got an empty batch; pass at least one sample")
    return np.ascontiguousarray(x, dtype=dtype)


def _static_shape(dims: Sequence[Any]) -> list[int | None]:
    """onnxruntime's shape (ints, or names/None for dynamic dims) with every dynamic dim as ``None``."""
    return [d if isinstance(d, int) else None for d in dims]


class OnnxModel:
    """One static subnet exported by ``export_onnx``: ``model(x) -> logits`` with numpy arrays."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None):
        self.path = Path(path)
        self.session = _session(self.path, providers)
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise ValueError(f"{self.path} has {len(inp)} inputs; OnnxModel runs single-input models")
        self.input_name = inp[0].name
        self.input_shape = _static_shape(inp[0].shape)
        self.dtype = _ORT_DTYPES.get(inp[0].type, np.float32)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.arch: dict[str, int] | None = (
            json.loads(meta["dynaslice.arch"]) if "dynaslice.arch" in meta else None
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x, self.input_shape, self.dtype, f"{self.path.name}")
        return self.session.run(None, {self.input_name: x})[0]


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    if not isinstance(d, dict) or key not in d or not isinstance(d[key], kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(
            f"{path} is damaged: {where}{key!r} is missing or not a {names}; re-export the package with "
            "dynaslice.onnx_export.export_gated"
        )
    return d[key]


def _file(d: dict, where: str, path: Path) -> str:
    name = _get(d, "file", str, where, path)
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(
            f"{path} is damaged: {where}'file' {name!r} is not a plain file name; re-export the package"
        )
    return name


def read_manifest(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The checked ``manifest.json`` of a package (gated or budget table; ``kind``: the format
    required, default either); raises a clear error if it is missing or damaged."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a dynaslice ONNX package; write one with "
            "dynaslice.onnx_export (export_gated, export_budget)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export the package") from e
    kinds = (kind,) if kind else (FORMAT, BUDGET_FORMAT)
    if not isinstance(manifest, dict) or manifest.get("format") not in kinds:
        raise ValueError(f"{path} is not a {' or '.join(map(repr, kinds))} manifest; re-export the package")
    version = _get(manifest, "format_version", int, "", path)
    if version != FORMAT_VERSION:
        newer = version > FORMAT_VERSION
        raise ValueError(
            f"{path} has format_version {version}, this runtime reads {FORMAT_VERSION}; "
            + ("upgrade dynaslice (or copy a newer runtime.py)" if newer else "re-export the package")
        )
    _check_manifest_input(manifest, path)
    _get(manifest, "num_classes", int, "", path)
    if manifest["format"] == FORMAT:
        _file(_get(manifest, "trunk", dict, "", path), "trunk.", path)
        _check_list(manifest, "routes", 2, path)
    else:
        for i, e in enumerate(_check_list(manifest, "entries", 1, path)):
            _get(e, "val_accuracy", (int, float), f"entries[{i}].", path)
    return manifest


def _check_manifest_input(manifest: dict, path: Path) -> None:
    inp = _get(manifest, "input", dict, "", path)
    shape = _get(inp, "shape", list, "input.", path)
    if not shape or shape[0] is not None or not all(isinstance(s, int) and s > 0 for s in shape[1:]):
        raise ValueError(f"{path} is damaged: input.shape {shape} is not [null, C, H, W]; re-export the package")
    dtype = _get(inp, "dtype", str, "input.", path)
    try:
        np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{path} is damaged: input.dtype {dtype!r} is not a numpy dtype; re-export the package") from e


def _check_list(manifest: dict, key: str, minimum: int, path: Path) -> list:
    """A list of ``{file, arch, macs}`` entries (routes or budget entries), at least ``minimum`` long."""
    items = _get(manifest, key, list, "", path)
    if len(items) < minimum:
        raise ValueError(f"{path} is damaged: it lists {len(items)} {key}, fewer than {minimum}; re-export the package")
    for i, item in enumerate(items):
        _file(item, f"{key}[{i}].", path)
        _get(item, "arch", dict, f"{key}[{i}].", path)
        _get(item, "macs", (int, float), f"{key}[{i}].", path)
    return items


def pick_entry(
    entries: Sequence[dict[str, Any]], max_macs: float | None = None, max_latency_ms: float | None = None
) -> int:
    """Index of the most accurate entry (``val_accuracy``) whose ``macs`` / ``latency_ms`` fit the
    budget (every limit given must hold); on a tie the cheaper one. The one rule of budget
    switching, used by ``dynaslice.budget.BudgetTable`` and :class:`BudgetOnnxRunner` alike."""
    if not entries:
        raise ValueError("the budget table is empty")
    if max_latency_ms is not None and any(e.get("latency_ms") is None for e in entries):
        raise ValueError("this budget table has no latencies: train with train.pss.latency_table set, or use max_macs")
    fits = [
        i
        for i, e in enumerate(entries)
        if (max_macs is None or e["macs"] <= max_macs)
        and (max_latency_ms is None or e["latency_ms"] <= max_latency_ms)
    ]
    if not fits:
        cheapest = min(entries, key=lambda e: e["macs"])
        need = f"{cheapest['macs'] / 1e6:.3g} MMACs"
        if cheapest.get("latency_ms") is not None:
            need += f", {cheapest['latency_ms']:.3g} ms"
        asked = ", ".join(
            f"{k}={v:g}" for k, v in (("max_macs", max_macs), ("max_latency_ms", max_latency_ms)) if v is not None
        )
        raise ValueError(f"no subnet of the budget table fits {asked}; the cheapest needs {need}")
    return max(fits, key=lambda i: (entries[i]["val_accuracy"], -entries[i]["macs"]))


class GatedOnnxRunner:
    """A gated (DS-Net) model package run with onnxruntime, route-bucketed like ``DynamicNet``.

    ``runner(x) -> logits``; ``runner.route(x) -> route index per sample``;
    ``runner.forward_with_routes(x) -> (logits, routes)``. Inputs are numpy arrays ``[B, C, H, W]``,
    already normalised as ``runner.manifest["input"]`` says (``mean``/``std``, when recorded).
    """

    def __init__(self, directory: str | Path, providers: Sequence[str] | None = None):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, FORMAT)
        m = self.manifest
        self.input_shape: list[int | None] = m["input"]["shape"]
        self.dtype = np.dtype(m["input"]["dtype"]).type
        self.num_classes: int = m["num_classes"]
        self.routes: list[dict[str, int]] = [r["arch"] for r in m["routes"]]
        self.route_macs = np.array([r["macs"] for r in m["routes"]], dtype=np.float64)
        self.trunk = _session(self.directory / m["trunk"]["file"], providers)
        self.sessions = [_session(self.directory / r["file"], providers) for r in m["routes"]]
        gate_width = self.trunk.get_outputs()[-1].shape[-1]
        if len(self.trunk.get_outputs()) != 2 or gate_width != len(self.routes):
            raise ValueError(
                f"{self.directory / m['trunk']['file']} does not output (features, logits over "
                f"{len(self.routes)} routes); the package is inconsistent: re-export it"
            )

    def _trunk(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = _check_input(x, self.input_shape, self.dtype, "GatedOnnxRunner")
        features, logits = self.trunk.run(None, {self.trunk.get_inputs()[0].name: x})
        return features, logits

    def route(self, x: np.ndarray) -> np.ndarray:
        """The route index of each sample (``int64 [B]``): argmax of the gate's logits."""
        return self._trunk(x)[1].argmax(1)

    def forward_with_routes(
        self, x: np.ndarray, routes: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(class logits [B, num_classes], route index per sample [B])``.

        ``routes`` overrides the gate's choice (the trunk and gate still run), as in ``DynamicNet``.
        """
        features, logits = self._trunk(x)
        n = features.shape[0]
        if routes is None:
            routes = logits.argmax(1)
        routes = np.asarray(routes)
        if routes.shape != (n,) or routes.dtype.kind not in "iu":
            raise ValueError(
                f"routes must be an integer array of shape [{n}], got {routes.dtype} {list(routes.shape)}"
            )
        present = np.unique(routes)
        if present[0] < 0 or present[-1] >= len(self.sessions):
            raise ValueError(f"route indices {present.tolist()} outside 0..{len(self.sessions) - 1}")
        if len(present) == 1:  # the whole batch (always so at batch 1) on one route: no copies
            return self._run_route(int(present[0]), features), routes
        out = np.empty((n, self.num_classes), dtype=logits.dtype)
        for r in present:
            idx = np.flatnonzero(routes == r)
            out[idx] = self._run_route(int(r), features[idx])
        return out, routes

    def _run_route(self, r: int, features: np.ndarray) -> np.ndarray:
        session = self.sessions[r]
        return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(features)})[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward_with_routes(x)[0]

    def route_counts(self, routes: np.ndarray) -> list[int]:
        """How many samples took each route (narrowest route first)."""
        return np.bincount(np.asarray(routes).ravel(), minlength=len(self.routes)).tolist()

    def avg_macs(self, routes: np.ndarray) -> float:
        """Average MACs per image for these route choices (trunk, gate and route), from the manifest."""
        routes = np.asarray(routes).ravel()
        if routes.size == 0:
            raise ValueError("avg_macs needs at least one route choice")
        return float(self.route_macs[routes].mean())


class BudgetOnnxRunner:
    """A PSS budget-table package run with onnxruntime: ``runner(x, max_macs=...)`` runs the most
    accurate entry within the budget (:func:`pick_entry`), like ``dynaslice.budget.BudgetNet``.

    Every entry's session is created once, at load: switching budget costs a dictionary lookup.
    Inputs are numpy arrays ``[B, C, H, W]``, normalised as ``runner.manifest["input"]`` says.
    """

    def __init__(self, directory: str | Path, providers: Sequence[str] | None = None):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, BUDGET_FORMAT)
        self.entries: list[dict[str, Any]] = self.manifest["entries"]
        self.models = [OnnxModel(self.directory / e["file"], providers) for e in self.entries]

    def entry(self, max_macs: float | None = None, max_latency_ms: float | None = None) -> dict[str, Any]:
        """The manifest entry that a call with this budget runs."""
        return self.entries[pick_entry(self.entries, max_macs, max_latency_ms)]

    def __call__(self, x: np.ndarray, max_macs: float | None = None, max_latency_ms: float | None = None) -> np.ndarray:
        return self.models[pick_entry(self.entries, max_macs, max_latency_ms)](x)
