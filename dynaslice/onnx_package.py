"""The onnxruntime form of every exported artifact: read, check and run ONNX files and packages
with onnxruntime and numpy only.

Each deployable artifact has one front end per form, and this module is the onnxruntime one:

=================  ===========================  ===============================  =========================
artifact           torch module                 onnxruntime (this module)        served, any runtime
=================  ===========================  ===============================  =========================
one subnet         ``extract_subnet(net, a)``   :class:`OnnxModel`               ``ServedSubnet``
gated (DS-Net)     ``dynamic.DynamicNet``       :class:`GatedOnnxRunner`         ``ServedGated``
budget table       ``budget.BudgetNet``         :class:`BudgetOnnxRunner`        ``ServedBudget``
=================  ===========================  ===============================  =========================

``dynaslice.serve.load`` opens an exported package with the runners here (:func:`open_package`;
nothing else reads a package to run it) and only adds the served call convention (torch tensors
or numpy, NaN refused); the ``Served*`` classes built from torch modules are the in-process forms
(eager, frozen, compiled, a module exported on the fly). The rules every form shares live here,
once: which budget entry a budget picks (:func:`pick_entry`) and how a batch is split by route
and put back in order (:func:`run_grouped`); the torch forms import them.

Why this module sits at the bottom of the package and not inside ``dynaslice.serve``: it imports
nothing from torch or from the rest of dynaslice (only the standard library, ``numpy`` and, when a
model is loaded, ``onnxruntime``), so a deployment target that has no torch can copy it alone and
import it as a plain module (tests/test_onnx.py does); and the torch forms below ``serve``
(``budget``, ``gate``) import its shared rules, which they could not from a module whose package
``__init__`` imports them. (``import dynaslice.onnx_package`` runs the package's ``__init__``,
which does import torch.)

- :class:`OnnxModel` runs one static subnet written by ``dynaslice.onnx_export.export_onnx``.
- :class:`GatedOnnxRunner` runs a gated (DS-Net) model package written by
  ``dynaslice.onnx_export.export_gated``: the trunk and gate once on the whole batch, then the
  samples grouped by the argmax route (:func:`run_grouped`), each group through its route's
  dense subnet, outputs put back in input order -- the same computation as ``DynamicNet``.
- :class:`BudgetOnnxRunner` runs a PSS budget-table package written by
  ``dynaslice.onnx_export.export_budget``: ``runner(x, max_macs=...)`` runs the most accurate
  entry within the budget, as ``dynaslice.budget.BudgetNet`` does (:func:`pick_entry`).

Package layouts (``manifest.json``, ``format_version`` 1)::

    gated:   manifest.json   format, input shape/dtype/normalisation, cut, routes (arch, MACs, file)
             trunk.onnx      input -> (features, logits): stem, stages before the cut, the gate
             route_{i}.onnx  features -> logits: route i's stages after the cut and the head
    budget:  manifest.json   format, input, entries (bucket, arch, MACs, val accuracy, latency, file)
             entry_{i}.onnx  input -> logits: entry i's subnet with the BN statistics it was selected with

**The package rule.** Every file dynaslice reads from a package or writes into one goes through
:func:`package_file`: a plain file name (no folder part), inside the package folder, a regular
file that is not a symbolic link, and no larger than a cap checked before anything is read or
allocated. Graphs are read through it once (:func:`read_package_file`, ``O_NOFOLLOW``) and handed
to onnxruntime as bytes, so no later swap of the path is followed either. The files of a package
are the ones its manifest names (:func:`package_members`: the trunk, ``routes[]``, ``entries[]``),
at most :data:`MAX_ITEMS` of them, and one session is opened per distinct file. A manifest is no
place for an arbitrary path: a package can be copied, mailed and served by someone else, who
must not find it reading or overwriting files outside it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "dynaslice-gated-onnx"
BUDGET_FORMAT = "dynaslice-budget-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

MAX_ITEMS = 1024  # routes or entries of one manifest; a package dynaslice writes has a handful
MAX_MANIFEST_BYTES = 16 << 20
MAX_GRAPH_BYTES = 2 << 30  # protobuf's limit: ONNX files dynaslice writes are single files below it
MAX_IMAGE_ELEMENTS = 1 << 24  # C * H * W of one input image (about 3 x 2364 x 2364)

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def package_file(
    directory: str | Path, name: Any, max_bytes: int = MAX_GRAPH_BYTES, exists: bool = True
) -> Path:
    """``directory / name`` checked by the package rule, for reading (``exists``) or writing.

    Refuses (``ValueError``) a ``name`` that is not a plain file name (a folder part, ``..``, an
    absolute path), a path that is a symbolic link or not a regular file (a folder, a FIFO, a
    device), and a file over ``max_bytes``; a missing file is a ``FileNotFoundError`` when it
    should exist. For writing (``exists=False``) a missing file is fine, an existing one must pass.
    """
    directory = Path(directory)
    if not _plain_name(name):
        raise ValueError(
            f"{directory}: {name!r} is not a plain file name; a package's files sit in its own folder"
        )
    path = directory / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if exists:
            raise FileNotFoundError(
                f"ONNX package file {path} is missing; re-export the package with dynaslice.onnx_export"
            ) from None
        return path
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{path} is a symbolic link; a package holds its own files, never links to others")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file; re-export the package")
    if st.st_size > max_bytes:
        raise ValueError(f"{path} has {st.st_size} bytes, more than the {max_bytes} a package file may have")
    return path


def _plain_name(name: Any) -> bool:
    """A file name with no folder part: nothing that could lead out of the package folder."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and Path(name).name == name
    )


def read_package_file(directory: str | Path, name: Any, max_bytes: int = MAX_GRAPH_BYTES) -> bytes:
    """The bytes of a package file (:func:`package_file`), read through a descriptor opened with
    ``O_NOFOLLOW`` and checked again, so a link swapped in after the check is not followed."""
    path = package_file(directory, name, max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ValueError(f"{path} cannot be opened as a regular file of the package ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise ValueError(
                f"{path} changed while it was read; it is not a regular file within the size cap"
            )
        return f.read(max_bytes + 1)[:max_bytes]


def package_members(manifest: Mapping[str, Any]) -> list[str]:
    """The files of a checked manifest (:func:`read_manifest`): trunk, routes, entries, each once,
    in manifest order. Nothing else in a manifest names a file of the package."""
    return list(dict.fromkeys(item["file"] for item in package_items(manifest)))


def package_items(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The checked items of a manifest that name files, by its format: a gated package's trunk
    and routes, a budget table's entries (keys of the other format are not read, nor checked)."""
    if manifest["format"] == FORMAT:
        return [manifest["trunk"], *manifest["routes"]]
    return list(manifest["entries"])


def providers_for(device: str) -> list[str]:
    """onnxruntime's execution providers for a device type (``"cpu"``, ``"cuda"``): on CUDA its
    provider first and the CPU for the ops it lacks; anywhere else the CPU."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def open_session(
    path: Path,
    providers: Sequence[str] | None = None,
    *,
    threads: int | None = None,
    data: bytes | None = None,
) -> Any:
    """An onnxruntime session for ``path`` (or its ``data``, read by :func:`read_package_file`).

    The one place dynaslice makes a session -- the runners below, serving
    (``dynaslice.serve.runtimes.ort_session``), quantization and the benchmarks
    (tests/test_architecture.py holds it) -- so a benchmark times the configuration users run:

    - every graph optimisation (``ORT_ENABLE_ALL``);
    - ``threads`` intra-op threads (None: onnxruntime's own default, one per physical core;
      serving passes torch's count, the benchmarks their ``--threads``), one inter-op thread;
    - no spinning: idle pool threads would busy-wait between runs and take the cores from
      whatever runs next in the process (the next piece, torch, the caller's own work);
    - errors only in onnxruntime's log: optimizer notes are not the user's business;
    - ``providers`` (default: the CPU; :func:`providers_for` gives a device's).

    A file onnxruntime cannot load is one ``ValueError`` that says which file and what to do
    (onnxruntime's own error types derive from ``Exception`` only).
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(
            "running ONNX models needs onnxruntime: pip install onnxruntime (or 'dynaslice[onnx]')"
        ) from e
    if data is None and not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} is missing; re-export it with dynaslice.onnx_export")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        source = str(path) if data is None else data
        return ort.InferenceSession(source, options, providers=list(providers or providers_for("cpu")))
    except Exception as e:  # onnxruntime's own types (InvalidProtobuf, Fail, ...) derive from Exception
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


def package_sessions(
    directory: str | Path, manifest: Mapping[str, Any], opener: Any = None
) -> dict[str, Any]:
    """One onnxruntime session per distinct file of a checked manifest, each read by the package
    rule, checked against the manifest (:func:`check_package_graphs`). ``opener(path, data)``
    makes a session (default: :func:`open_session` on the CPU); serving passes its device and threads."""
    directory = Path(directory)
    if opener is None:
        opener = lambda path, data: open_session(path, data=data)  # noqa: E731
    sessions = {
        name: opener(directory / name, read_package_file(directory, name))
        for name in package_members(manifest)
    }
    check_package_graphs(directory, manifest, sessions)
    return sessions


def _io(session: Any) -> tuple[list[list[int | None]], list[list[int | None]]]:
    return (
        [_static_shape(i.shape) for i in session.get_inputs()],
        [_static_shape(o.shape) for o in session.get_outputs()],
    )


def check_package_graphs(directory: Path, manifest: Mapping[str, Any], sessions: Mapping[str, Any]) -> None:
    """Refuse graphs that do not fit their manifest: the trunk takes the manifest's image and
    outputs (features, one logit per route), each route takes the trunk's features, each budget
    entry takes the image; every classifier outputs ``num_classes`` logits; a graph that records
    its subnet (``dynaslice.arch``, and a route its ``dynaslice.route``) records the one the
    manifest says. A swapped or foreign file is caught here in one line, instead of failing inside
    onnxruntime on the first batch or, worse, running another subnet than the manifest names."""
    image = [None, *manifest["input"]["shape"][1:]]
    classes = manifest["num_classes"]

    def fits(got: list[int | None], want: list[int | None]) -> bool:
        return len(got) == len(want) and all(
            g is None or w is None or g == w for g, w in zip(got, want, strict=True)
        )

    def image_type(name: str) -> None:
        got = sessions[name].get_inputs()[0].type
        if np.dtype(_ORT_DTYPES.get(got, object)) != np.dtype(manifest["input"]["dtype"]):
            refuse(name, f"it takes {got}, the manifest's input is {manifest['input']['dtype']}")

    def refuse(name: str, what: str) -> None:
        raise ValueError(f"{directory / name} does not fit its manifest: {what}; re-export the package")

    def classifier(
        name: str, takes: list[int | None], what: str, item: Mapping[str, Any], route: int | None
    ) -> None:
        meta = sessions[name].get_modelmeta().custom_metadata_map
        if "dynaslice.arch" in meta and _json_or_none(meta["dynaslice.arch"]) != item["arch"]:
            refuse(
                name,
                f"it runs the subnet {meta['dynaslice.arch']}, the manifest names {json.dumps(item['arch'])}",
            )
        if route is not None and meta.get("dynaslice.route", str(route)) != str(route):
            refuse(name, f"it is route {meta['dynaslice.route']}'s graph, the manifest's route {route}")
        ins, outs = _io(sessions[name])
        if len(ins) != 1 or not fits(ins[0], takes):
            refuse(name, f"it takes {ins}, not one input of shape {takes} ({what})")
        if len(outs) != 1 or len(outs[0]) != 2 or outs[0][1] not in (None, classes):
            refuse(name, f"it outputs {outs}, not logits over {classes} classes")

    if manifest["format"] == FORMAT:
        trunk = manifest["trunk"]["file"]
        if trunk in {r["file"] for r in manifest["routes"]}:
            refuse(trunk, "the trunk's file is also a route's")
        ins, outs = _io(sessions[trunk])
        if len(ins) != 1 or not fits(ins[0], image):
            refuse(trunk, f"it takes {ins}, not one image input of shape {image}")
        image_type(trunk)
        if len(outs) != 2 or len(outs[1]) != 2 or outs[1][1] not in (None, len(manifest["routes"])):
            refuse(trunk, f"it outputs {outs}, not (features, logits over {len(manifest['routes'])} routes)")
        for i, r in enumerate(manifest["routes"]):
            classifier(r["file"], outs[0], "the trunk's features", r, i)
    else:
        for e in manifest["entries"]:
            classifier(e["file"], image, "the image", e, None)
            image_type(e["file"])


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def check_image_shape(shape: Sequence[Any], what: str) -> None:
    """Refuse an image shape ``[C, H, W]`` larger than :data:`MAX_IMAGE_ELEMENTS` before anything
    of that size is allocated (calibration images, example inputs)."""
    if math.prod(int(d) for d in shape) > MAX_IMAGE_ELEMENTS:
        raise ValueError(
            f"{what} declares images of shape {list(shape)}, more than {MAX_IMAGE_ELEMENTS} values each; "
            "dynaslice does not allocate inputs that large"
        )


class OnnxModel:
    """One static subnet exported by ``export_onnx``: ``model(x) -> logits`` with numpy arrays."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, session: Any = None):
        self.path = Path(path)
        self.session = open_session(self.path, providers) if session is None else session
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise ValueError(f"{self.path} has {len(inp)} inputs; OnnxModel runs single-input models")
        self.input_name = inp[0].name
        self.input_shape = _static_shape(inp[0].shape)
        self.dtype = _ORT_DTYPES.get(inp[0].type, np.float32)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.arch: dict[str, int] | None = None
        if "dynaslice.arch" in meta:
            self.arch = _json_or_none(meta["dynaslice.arch"])
            if not isinstance(self.arch, dict):
                raise ValueError(f"{self.path}: its dynaslice.arch metadata is not an arch; re-export it")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x, self.input_shape, self.dtype, f"{self.path.name}")
        return self.session.run(None, {self.input_name: x})[0]


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    value = d.get(key) if isinstance(d, dict) else None
    # JSON's true/false are ints to Python, and NaN/Infinity parse as floats: none is a count or an amount
    bad_number = isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value))
    if not isinstance(value, kind) or bad_number:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(
            f"{path} is damaged: {where}{key!r} is missing or not a {'finite ' if names != 'str' else ''}{names}; "
            "re-export the package with dynaslice.onnx_export"
        )
    return value


def _file(d: dict, where: str, path: Path) -> str:
    name = _get(d, "file", str, where, path)
    if not _plain_name(name):  # the name alone: the file itself is checked when it is read
        raise ValueError(
            f"{path} is damaged: {where}'file' {name!r} is not a plain file name of the package; "
            "re-export the package"
        )
    return name


def read_manifest(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The checked ``manifest.json`` of a package (gated or budget table; ``kind``: the format
    required, default either); raises a clear error if it is missing or damaged.

    Every field a runner, :func:`dynaslice.serve.load` or ``dynaslice quantize`` reads is checked
    here (types, finite numbers, plain file names, at most :data:`MAX_ITEMS` routes or entries),
    so a damaged or hostile manifest is one ``ValueError`` and never a crash further on."""
    path = Path(directory) / MANIFEST
    try:
        text = read_package_file(directory, MANIFEST, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a dynaslice ONNX package; write one with "
            "dynaslice.onnx_export (export_gated, export_budget)"
        ) from None
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export the package") from e
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a manifest; re-export the package") from None
    kinds = (kind,) if kind else (FORMAT, BUDGET_FORMAT)
    if not isinstance(manifest, dict) or manifest.get("format") not in kinds:
        raise ValueError(f"{path} is not a {' or '.join(map(repr, kinds))} manifest; re-export the package")
    version = _get(manifest, "format_version", int, "", path)
    if version != FORMAT_VERSION:
        newer = version > FORMAT_VERSION
        raise ValueError(
            f"{path} has format_version {version}, this runtime reads {FORMAT_VERSION}; "
            + ("upgrade dynaslice (or copy a newer onnx_package.py)" if newer else "re-export the package")
        )
    _check_manifest_input(manifest, path)
    if _get(manifest, "num_classes", int, "", path) < 1:
        raise ValueError(
            f"{path} is damaged: num_classes {manifest['num_classes']} is not positive; re-export the package"
        )
    if manifest["format"] == FORMAT:
        _file(_get(manifest, "trunk", dict, "", path), "trunk.", path)
        _check_list(manifest, "routes", 2, path)
    else:
        for i, e in enumerate(_check_list(manifest, "entries", 1, path)):
            where = f"entries[{i}]."
            _get(e, "val_accuracy", (int, float), where, path)
            _get(e, "bucket", (int, float), where, path)
            if "candidates" in e:
                _get(e, "candidates", int, where, path)
            if e.get("latency_ms") is not None and _get(e, "latency_ms", (int, float), where, path) < 0:
                raise ValueError(f"{path} is damaged: {where}'latency_ms' is negative; re-export the package")
    return manifest


def _check_manifest_input(manifest: dict, path: Path) -> None:
    inp = _get(manifest, "input", dict, "", path)
    shape = _get(inp, "shape", list, "input.", path)
    if (
        len(shape) != 4
        or shape[0] is not None
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape[1:])
    ):
        raise ValueError(
            f"{path} is damaged: input.shape {shape} is not [null, C, H, W]; re-export the package"
        )
    check_image_shape(shape[1:], str(path))
    dtype = _get(inp, "dtype", str, "input.", path)
    if dtype not in ("float32", "float64", "float16"):
        raise ValueError(
            f"{path} is damaged: input.dtype {dtype!r} is not a numpy dtype of a float graph "
            "(float32, float64, float16); re-export the package"
        )


def _check_list(manifest: dict, key: str, minimum: int, path: Path) -> list:
    """A list of ``{file, arch, macs}`` entries (routes or budget entries), ``minimum`` to
    :data:`MAX_ITEMS` long (a longer one would only make a loader open sessions until memory runs out)."""
    items = _get(manifest, key, list, "", path)
    if not minimum <= len(items) <= MAX_ITEMS:
        raise ValueError(
            f"{path} is damaged: it lists {len(items)} {key}, not {minimum} to {MAX_ITEMS}; re-export the package"
        )
    for i, item in enumerate(items):
        _file(item, f"{key}[{i}].", path)
        arch = _get(item, "arch", dict, f"{key}[{i}].", path)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in arch.values()):
            raise ValueError(
                f"{path} is damaged: {key}[{i}].arch is not a mapping of dimensions to whole numbers; re-export the package"
            )
        if _get(item, "macs", (int, float), f"{key}[{i}].", path) < 0:
            raise ValueError(f"{path} is damaged: {key}[{i}].macs is negative; re-export the package")
    return items


def pick_entry(
    entries: Sequence[dict[str, Any]], max_macs: float | None = None, max_latency_ms: float | None = None
) -> int:
    """Index of the most accurate entry (``val_accuracy``) whose ``macs`` / ``latency_ms`` fit the
    budget (every limit given must hold); on a tie the cheaper one. The one rule of budget
    switching, used by ``dynaslice.budget.BudgetTable`` and :class:`BudgetOnnxRunner` alike."""
    if not entries:
        raise ValueError("the budget table is empty")
    for name, limit in (("max_macs", max_macs), ("max_latency_ms", max_latency_ms)):
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, numbers.Real) or math.isnan(limit)
        ):
            raise ValueError(f"{name} must be a number (e.g. 12e6 for 12 MMACs) or None, got {limit!r}")
    if max_latency_ms is not None and any(e.get("latency_ms") is None for e in entries):
        raise ValueError(
            "this budget table has no latencies: train with train.pss.latency_table set, or use max_macs"
        )
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
            f"{k}={v:g}"
            for k, v in (("max_macs", max_macs), ("max_latency_ms", max_latency_ms))
            if v is not None
        )
        raise ValueError(f"no subnet of the budget table fits {asked}; the cheapest needs {need}")
    return max(fits, key=lambda i: (entries[i]["val_accuracy"], -entries[i]["macs"]))


def run_grouped(h: Any, routes: Any, run: Callable[[Any, int], Any], n_routes: int) -> Any:
    """``run(h[i], r)`` for every sample ``i`` with ``r = routes[i]``, one call per route taken.

    The one implementation of route-bucketed batches: the torch form
    (``GatedSupernet.forward_routes``, hence ``DynamicNet`` and the served models on torch
    runtimes) and the onnxruntime form (:class:`GatedOnnxRunner`) both call it. ``h`` is a numpy
    array or a torch tensor (its rows are taken with ``h[idx]`` and written with ``out[idx] = y``,
    which both define, the tensor's with autograd); ``routes`` holds one route index per sample
    on the host (a numpy array, or a CPU tensor: a CUDA caller moves its ``[B]`` indices first).
    Each group runs densely in one call, a route no sample takes costs nothing, a batch on one
    route (always so at batch 1) runs whole without copies, and outputs come back in input order.
    """
    routes = np.asarray(routes)
    present = np.unique(routes)  # sorted
    if present.size == 0:
        raise ValueError("got an empty batch; pass at least one sample")
    if present[0] < 0 or present[-1] >= n_routes:
        raise ValueError(f"route indices {present.tolist()} outside 0..{n_routes - 1}")
    if present.size == 1:
        return run(h, int(present[0]))
    out = None
    for r in present:
        idx = np.flatnonzero(routes == r)
        y = run(h[idx], int(r))
        if out is None:
            shape = (len(routes), *y.shape[1:])
            out = np.empty(shape, dtype=y.dtype) if isinstance(y, np.ndarray) else y.new_empty(shape)
        out[idx] = y
    return out


def _run(session: Any, x: np.ndarray) -> list[np.ndarray]:
    """The outputs of a one-input session on ``x``."""
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x)})


def run_gated(
    trunk: Any, routes: Sequence[Any], x: np.ndarray, chosen: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A gated model's forward on onnxruntime sessions, numpy throughout: ``(class logits, route
    per sample)``. The trunk (with the gate) runs once on the batch, each sample takes the gate's
    argmax route (or ``chosen[i]``; the gate still runs), and :func:`run_grouped` sends each
    group through its route's session. The one onnxruntime gated forward: :class:`GatedOnnxRunner`
    and the served models whose pieces are CPU sessions (``dynaslice.serve``) call it."""
    features, logits = _run(trunk, x)
    n = features.shape[0]
    chosen = logits.argmax(1) if chosen is None else np.asarray(chosen)  # argmax: the first of equal maxima
    if chosen.shape != (n,) or chosen.dtype.kind not in "iu":
        raise ValueError(
            f"routes must be an integer array of shape [{n}], got {chosen.dtype} {list(chosen.shape)}"
        )
    out = run_grouped(features, chosen, lambda h, r: _run(routes[r], h)[0], len(routes))
    return out, chosen


class GatedOnnxRunner:
    """A gated (DS-Net) model package run with onnxruntime, route-bucketed like ``DynamicNet``.

    ``runner(x) -> logits``; ``runner.route(x) -> route index per sample``;
    ``runner.forward_with_routes(x) -> (logits, routes)``. Inputs are numpy arrays ``[B, C, H, W]``,
    already normalised as ``runner.manifest["input"]`` says (``mean``/``std``, when recorded).
    ``providers`` and ``threads`` go to :func:`open_session` for every graph.
    """

    def __init__(
        self, directory: str | Path, providers: Sequence[str] | None = None, threads: int | None = None
    ):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, FORMAT)
        m = self.manifest
        self.input_shape: list[int | None] = m["input"]["shape"]
        self.dtype = np.dtype(m["input"]["dtype"]).type
        self.num_classes: int = m["num_classes"]
        self.routes: list[dict[str, int]] = [r["arch"] for r in m["routes"]]
        self.route_macs = np.array([r["macs"] for r in m["routes"]], dtype=np.float64)
        sessions = package_sessions(
            self.directory, m, lambda path, data: open_session(path, providers, threads=threads, data=data)
        )
        self.trunk = sessions[m["trunk"]["file"]]
        self.sessions = [sessions[r["file"]] for r in m["routes"]]  # routes naming one file share its session

    def route(self, x: np.ndarray) -> np.ndarray:
        """The route index of each sample (``int64 [B]``): argmax of the gate's logits."""
        x = _check_input(x, self.input_shape, self.dtype, "GatedOnnxRunner")
        return _run(self.trunk, x)[1].argmax(1)

    def forward_with_routes(
        self, x: np.ndarray, routes: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(class logits [B, num_classes], route index per sample [B])``.

        ``routes`` overrides the gate's choice (the trunk and gate still run), as in ``DynamicNet``.
        """
        x = _check_input(x, self.input_shape, self.dtype, "GatedOnnxRunner")
        return run_gated(self.trunk, self.sessions, x, routes)

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
        if routes.dtype.kind not in "iu" or routes.min() < 0 or routes.max() >= len(self.routes):
            raise ValueError(
                f"avg_macs takes route indices 0..{len(self.routes) - 1}, got {routes.dtype} {routes.tolist()[:8]}"
            )
        return float(self.route_macs[routes].mean())


class BudgetOnnxRunner:
    """A PSS budget-table package run with onnxruntime: ``runner(x, max_macs=...)`` runs the most
    accurate entry within the budget (:func:`pick_entry`), like ``dynaslice.budget.BudgetNet``.

    Every file's session is created once, at load: switching budget costs a dictionary lookup.
    Inputs are numpy arrays ``[B, C, H, W]``, normalised as ``runner.manifest["input"]`` says.
    ``providers`` and ``threads`` go to :func:`open_session` for every graph.
    """

    def __init__(
        self, directory: str | Path, providers: Sequence[str] | None = None, threads: int | None = None
    ):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, BUDGET_FORMAT)
        self.entries: list[dict[str, Any]] = self.manifest["entries"]
        sessions = package_sessions(
            self.directory, self.manifest, lambda path, data: open_session(path, providers, threads=threads, data=data)
        )
        models = {name: OnnxModel(self.directory / name, session=s) for name, s in sessions.items()}
        self.models = [models[e["file"]] for e in self.entries]  # entries naming one file share its session

    def entry(self, max_macs: float | None = None, max_latency_ms: float | None = None) -> dict[str, Any]:
        """The manifest entry that a call with this budget runs."""
        return self.entries[pick_entry(self.entries, max_macs, max_latency_ms)]

    def __call__(
        self, x: np.ndarray, max_macs: float | None = None, max_latency_ms: float | None = None
    ) -> np.ndarray:
        return self.models[pick_entry(self.entries, max_macs, max_latency_ms)](x)


def open_package(
    directory: str | Path, providers: Sequence[str] | None = None, threads: int | None = None
) -> GatedOnnxRunner | BudgetOnnxRunner:
    """The runner of the package in ``directory``, chosen by its manifest's format: the one way a
    package is opened to run (``dynaslice.serve.load`` calls it). ``providers`` and ``threads``
    go to :func:`open_session` for every graph (default: the CPU, onnxruntime's thread count)."""
    runner = GatedOnnxRunner if read_manifest(directory)["format"] == FORMAT else BudgetOnnxRunner
    return runner(directory, providers, threads)
