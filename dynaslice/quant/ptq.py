"""Int8 post-training quantization of dynaslice's ONNX artifacts with onnxruntime (static, QDQ).

``quantize_artifact(src, dst, images)`` takes what :mod:`dynaslice.onnx_export` writes -- one
subnet ``.onnx`` file, or a package directory (``manifest.json`` + one graph per piece: a gated
model's trunk and routes, a budget table's entries) -- and writes its int8 twin, which loads with
the same runner classes (:class:`dynaslice.onnx_package.OnnxModel`, :class:`~dynaslice.onnx_package.GatedOnnxRunner`,
:class:`~dynaslice.onnx_package.BudgetOnnxRunner`).

For every graph: onnxruntime's pre-processing (``quant_pre_process``: symbolic shape inference,
graph optimisation -- BatchNorm folded into the convolutions -- and ONNX shape inference), then
``quantize_static`` in QDQ format with per-channel symmetric int8 weights and asymmetric uint8
activations whose ranges come from the calibration images (MinMax by default). A package graph
whose input is another graph's output (a route reads the trunk's ``features``) is calibrated on
what the float producer outputs for the calibration images; a route sees every image's features,
not only those its gate would send it.

What was done is recorded where the artifact keeps its description: the ``dynaslice.quantization``
metadata entry of each ``.onnx`` file, and a ``quantization`` block in a package's manifest (whose
format and version stay those of the float package, so older runners read it). Both hold the
settings, the calibration source and the exact accounting of :func:`graph_accounting`: MACs per
image of every Conv/Gemm/MatMul and the bit widths its weights and input activations run at
(summed per route of a gated package and per entry of a budget table).

:func:`compare_artifacts` reports the accuracy of the int8 artifact beside its float original.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .. import runs
from ..atomic import atomic_dir, atomic_path
from ..onnx_export import check_package_target
from ..onnx_package import (
    BUDGET_FORMAT,
    FORMAT,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    BudgetOnnxRunner,
    GatedOnnxRunner,
    OnnxModel,
    check_image_shape,
    check_package_graphs,
    open_session,
    package_file,
    package_members,
    read_manifest,
    read_package_file,
)

__all__ = [
    "QUANT_KEY",
    "artifact_archs",
    "artifact_input_shape",
    "artifact_kind",
    "compare_artifacts",
    "evaluate_artifact",
    "graph_accounting",
    "quantize_artifact",
]

QUANT_KEY = "dynaslice.quantization"  # metadata entry of a quantized .onnx file
ArtifactKind = Literal["model", "package"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
_NOT_OURS = (
    "{path} is not a dynaslice ONNX artifact (an .onnx file written by dynaslice.onnx_export.export_onnx, "
    "or a package directory with a dynaslice manifest.json); export the model with dynaslice first"
)


def _onnx():
    try:
        import onnx
        import onnxruntime.quantization  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "int8 quantization needs onnx and onnxruntime: pip install 'dynaslice[onnx]'"
        ) from e
    return onnx


# --------------------------------------------------------------------------- what is it?


def _metadata(path: Path) -> dict[str, str]:
    onnx = _onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(_NOT_OURS.format(path=path) + f" (it does not parse as ONNX: {e})") from e
    return {p.key: p.value for p in model.metadata_props}


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        data = read_package_file(directory, MANIFEST, MAX_MANIFEST_BYTES)  # a link is refused as such
    except FileNotFoundError:
        raise ValueError(_NOT_OURS.format(path=directory)) from None
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(_NOT_OURS.format(path=directory)) from None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("dynaslice-"):
        raise ValueError(_NOT_OURS.format(path=directory))
    return read_manifest(directory)  # the runtime's own check of a gated or budget-table manifest


def artifact_kind(path: str | os.PathLike) -> ArtifactKind:
    """``"model"`` for a dynaslice ``.onnx`` file, ``"package"`` for a dynaslice package directory.

    Anything else (a missing path, an ONNX file dynaslice did not write, a directory without a
    dynaslice manifest) raises one ``ValueError`` (``FileNotFoundError`` if missing) saying so.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass an exported .onnx file or package directory")
    if path.is_dir():
        _read_manifest(path)
        return "package"
    if "dynaslice.version" not in _metadata(path):
        raise ValueError(_NOT_OURS.format(path=path))
    return "model"


def artifact_input_shape(path: str | os.PathLike) -> list[int]:
    """The ``[C, H, W]`` of the images an artifact takes (from its graph, or its package manifest)."""
    path = Path(path)
    if artifact_kind(path) == "package":
        return list(_read_manifest(path)["input"]["shape"][1:])  # checked, size-capped
    shape = OnnxModel(path).input_shape[1:]
    if any(d is None for d in shape):
        raise ValueError(f"{path} has a dynamic image size {shape}; export it with a fixed input size")
    check_image_shape(shape, str(path))
    return [int(d) for d in shape]


def artifact_archs(path: str | os.PathLike) -> list[dict[str, int]]:
    """The subnets an artifact runs: a model file's arch, a gated package's routes, a budget table's entries."""
    path = Path(path)
    if artifact_kind(path) == "model":
        arch = OnnxModel(path).arch
        if arch is None:
            raise ValueError(f"{path} does not record its subnet (dynaslice.arch); re-export it with dynaslice")
        return [arch]
    manifest = _read_manifest(path)
    return [item["arch"] for item in manifest["routes" if manifest["format"] == FORMAT else "entries"]]


def _subnet_graphs(path: Path, index: int) -> list[Any]:
    """The ONNX graphs (``ModelProto``) that run subnet ``index`` of :func:`artifact_archs`: the
    model file, a budget entry's file, or a gated package's trunk and route ``index``."""
    onnx = _onnx()
    if artifact_kind(path) == "model":
        return [onnx.load(str(path), load_external_data=False)]
    manifest = _read_manifest(path)
    if manifest["format"] == FORMAT:
        files = [manifest["trunk"]["file"], manifest["routes"][index]["file"]]
    else:
        files = [manifest["entries"][index]["file"]]
    try:
        return [onnx.load_model_from_string(read_package_file(path, name)) for name in files]
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"{path}: a graph of subnet {index} is not valid ONNX ({e}); re-export it") from e


def check_subnet(path: str | os.PathLike, index: int, subnet: Any) -> None:
    """Refuse an artifact whose graphs do not hold the weights of ``subnet`` (a torch module: the
    subnet :func:`artifact_archs` ``[index]`` names, extracted from the network it came from).

    The arch an artifact records (``dynaslice.arch``, a manifest's ``arch``) is a claim, and
    FDDA/GDFQ calibration trains its generator against the subnet that claim names: a false one
    trained it against the wrong network and was then copied into the int8 file. Every weight of
    two or more dimensions of ``subnet`` (convolutions, linear layers) must have a weight of the
    same shape in the graphs (a 2-D one possibly transposed, as a MatMul stores it). Shapes, not
    values: the graphs' BatchNorm may be folded into the convolutions, and their BN statistics
    may be another width's.
    """
    path = Path(path)
    available: dict[tuple[int, ...], int] = {}
    for model in _subnet_graphs(path, index):
        for t in model.graph.initializer:
            if len(t.dims) >= 2:
                available[tuple(t.dims)] = available.get(tuple(t.dims), 0) + 1
    missing = []
    for p in subnet.parameters():
        shape = tuple(p.shape)
        if len(shape) < 2:
            continue
        for s in (shape, shape[::-1]):
            if available.get(s, 0) > 0:
                available[s] -= 1
                break
        else:
            missing.append(list(shape))
    if missing:
        raise ValueError(
            f"{path} does not run the subnet it records ({len(missing)} of its weights, e.g. of shape "
            f"{missing[0]}, are not in its graphs): its arch metadata is wrong, or --run is not the run "
            "it was exported from; re-export it with dynaslice"
        )


# --------------------------------------------------------------------------- accounting


def _int_bits(dtype: int) -> int | None:
    onnx = _onnx()
    t = onnx.TensorProto
    return {t.INT8: 8, t.UINT8: 8, t.INT16: 16, t.UINT16: 16, t.INT4: 4, t.UINT4: 4}.get(dtype)


def graph_accounting(model: Any) -> dict[str, Any]:
    """MACs per image and bit widths of every Conv/Gemm/MatMul of an ONNX model (or its path).

    A layer's weight (or input activation) runs at ``b`` bits when it reaches the layer through a
    ``DequantizeLinear`` of a ``b``-bit integer tensor, else at 32 (float). MACs per image are
    exact: output elements per image times the reduction length (``C_in / groups * kh * kw`` for a
    convolution, ``K`` for a matrix product). Returns ``{"macs", "macs_by_bits": {"w8a8": ...,
    "float": ...}, "layers": [{"name", "op", "macs", "weight_bits", "activation_bits"}]}``.
    """
    onnx = _onnx()
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes: dict[str, list[int | None]] = {
        vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        for vi in [*g.value_info, *g.input, *g.output]
    }
    inits = {t.name: t for t in g.initializer}
    shapes.update({name: list(t.dims) for name, t in inits.items()})
    producer = {o: n for n in g.node for o in n.output}

    def bits(tensor: str) -> int:
        node = producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear":
            return 32
        source = inits.get(node.input[0])
        if source is None and len(node.input) > 2:  # an activation: its zero point says the type
            source = inits.get(node.input[2])
        return (_int_bits(source.data_type) if source is not None else None) or 32

    layers = []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
        if not out or not w or any(d is None for d in out[1:]):
            raise ValueError(
                f"cannot infer the shapes of {node.op_type} node {node.name!r}; re-export the model"
            )
        if node.op_type == "Conv":
            reduce = int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            reduce = w[1] if trans_b else w[0]
        else:
            reduce = w[-2]
        layers.append({
            "name": node.name, "op": node.op_type, "macs": int(np.prod(out[1:])) * int(reduce),
            "weight_bits": bits(node.input[1]), "activation_bits": bits(node.input[0]),
        })  # fmt: skip
    by_bits: dict[str, int] = {}
    for layer in layers:
        w, a = layer["weight_bits"], layer["activation_bits"]
        key = "float" if w == a == 32 else f"w{w}a{a}"
        by_bits[key] = by_bits.get(key, 0) + layer["macs"]
    return {"macs": sum(layer["macs"] for layer in layers), "macs_by_bits": by_bits, "layers": layers}


# --------------------------------------------------------------------------- one graph


def _reader(feeds: Mapping[str, np.ndarray], batch_size: int):
    """An onnxruntime CalibrationDataReader over ``feeds`` (input name -> array), in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            n = len(next(iter(feeds.values())))
            self._it = iter(
                [
                    {k: np.ascontiguousarray(v[i : i + batch_size]) for k, v in feeds.items()}
                    for i in range(0, n, batch_size)
                ]
            )

    return _Batches()


def _quantize_graph(
    src: Path,
    dst: Path,
    feeds: Mapping[str, np.ndarray],
    settings: Mapping[str, Any],
    record: Mapping[str, Any],
) -> dict[str, Any]:
    """Pre-process, quantize and annotate one graph; ``dst`` appears complete or not at all."""
    onnx = _onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-") as work:
        pre, out = Path(work) / "pre.onnx", Path(work) / "int8.onnx"
        quant_pre_process(str(src), str(pre))
        quantize_static(
            str(pre), str(out), _reader(feeds, settings["batch_size"]), quant_format=QuantFormat.QDQ,
            per_channel=True, reduce_range=settings["reduce_range"], activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=methods[settings["calibrate_method"]],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )  # fmt: skip
        model = onnx.load(str(out))
        accounting = graph_accounting(model)
        info = {**record, "accounting": accounting}
        entries = {p.key: p for p in model.metadata_props}
        for key, value in _float_metadata(src).items():  # keep dynaslice's own entries (arch, route...)
            if key not in entries:
                entry = model.metadata_props.add()
                entry.key, entry.value = key, value
        entry = model.metadata_props.add()
        entry.key, entry.value = QUANT_KEY, json.dumps(info)
        onnx.checker.check_model(model, full_check=True)
        with atomic_path(dst) as tmp:
            onnx.save(model, str(tmp))
    return accounting


def _float_metadata(path: Path) -> dict[str, str]:
    return {k: v for k, v in _metadata(path).items() if k.startswith("dynaslice.")}


# --------------------------------------------------------------------------- artifacts


def _check_images(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype.kind != "f" or len(images) == 0:
        raise ValueError(
            "calibration images must be a non-empty normalised float batch [N, C, H, W] "
            f"(see dynaslice.quant.calibration_images); got {images.dtype} {list(images.shape)}"
        )
    return images.astype(np.float32)


def quantize_artifact(
    source: str | os.PathLike,
    target: str | os.PathLike,
    images: Any,
    calibration: Mapping[str, Any] | None = None,
    calibrate_method: CalibrationMethod = "minmax",
    reduce_range: bool = True,
    batch_size: int = 32,
    replace: bool = True,
) -> Path:
    """Write the int8 (QDQ) version of the dynaslice ONNX artifact ``source`` to ``target``.

    ``images``: normalised calibration images ``[N, C, H, W]`` (numpy or torch), e.g.
    ``calibration_images(source, 256)``; ``calibration`` describes where they came from (recorded
    as is; ``source.describe()`` fits). ``reduce_range`` quantizes weights to 7 bits, which
    onnxruntime advises on x86 CPUs without VNNI, where u8 x s8 products can saturate.
    ``calibrate_method``: onnxruntime's ``minmax`` (default), ``entropy`` or ``percentile``.
    A package is written beside ``target`` and renamed into place, under ``target``'s lock (a
    second quantization into it at the same time is refused); an existing file, or a folder that
    holds a package and nothing else, is replaced, any other folder refused. Of a package only
    the manifest and the graphs it names are read (by the package rule of
    :func:`dynaslice.onnx_package.package_file`) and written: nothing else in its folder is copied.
    ``replace=False`` (the command line without ``--force``) refuses an existing target instead,
    also one that another process writes while this one runs (a model file is then created only
    if still absent, with ``os.link``).
    """
    source, target = Path(source), Path(target)
    kind = artifact_kind(source)
    if target.resolve() == source.resolve():
        raise ValueError(f"target {target} is the float original; write the int8 artifact to a new path")
    if calibrate_method not in ("minmax", "entropy", "percentile"):
        raise ValueError(
            f"unknown calibrate_method {calibrate_method!r}: choose minmax, entropy or percentile"
        )
    images = _check_images(images)
    settings = {
        "scheme": "onnxruntime static QDQ", "weights": "int8 per-channel symmetric",
        "activations": "uint8 per-tensor asymmetric", "weight_bits": 7 if reduce_range else 8,
        "activation_bits": 8, "calibrate_method": calibrate_method, "reduce_range": reduce_range,
        "batch_size": batch_size, "calibration": {**(calibration or {}), "images": len(images)},
    }  # fmt: skip
    if kind == "model":
        if QUANT_KEY in _metadata(source):
            raise ValueError(f"{source} is already quantized; quantize its float original instead")
        if target.is_dir():
            raise FileExistsError(f"{target} is a directory; give a file name for the int8 model")
        if target.exists() and not replace:
            raise FileExistsError(f"{target} exists; pass replace=True (--force) to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        feeds = {_input_names(source)[0]: images}
        if replace:
            _quantize_graph(source, target, feeds, settings, settings)
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp") as work:
            _quantize_graph(source, Path(work) / target.name, feeds, settings, settings)
            try:  # created only if still absent: a second run into the same new file is refused
                os.link(Path(work) / target.name, target)
            except FileExistsError:
                raise FileExistsError(
                    f"{target} was written by another process while this quantization ran; nothing replaced"
                ) from None
        return target
    return _quantize_package(source, target, images, settings, replace)


def _input_names(path: Path) -> list[str]:
    model = _onnx().load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _quantize_package(
    source: Path, target: Path, images: np.ndarray, settings: dict[str, Any], replace: bool
) -> Path:
    """The int8 package: the manifest and the graphs it names, nothing else of ``source``.

    Every graph is read once by the package rule (:func:`dynaslice.onnx_package.read_package_file`:
    a plain name, no link, size-capped); its bytes give the session that computes calibration
    inputs and a private copy that onnxruntime's pre-processing and quantization read. ``target`` is held
    under the run-directory lock (:func:`dynaslice.runs.exclusive`), so a second quantization
    into it is refused instead of both reporting success; it is replaced only if it holds a
    package and nothing else (:func:`dynaslice.onnx_export.check_package_target`).
    """
    manifest = _read_manifest(source)
    if "quantization" in manifest:
        raise ValueError(f"{source} is already quantized; quantize its float original instead")
    if target.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"{target} is inside the float package {source}; write the int8 package elsewhere")
    check_package_target(target)  # before the lock, which would put its file into any folder
    graphs = package_members(manifest)
    with runs.exclusive(target), atomic_dir(target) as tmp:  # complete or absent; a package there is replaced
        check_package_target(target)  # checked holding the lock: no other writer changes it now
        if not replace and (target / MANIFEST).exists():
            raise FileExistsError(f"{target} holds a package; pass replace=True (--force) to replace it")
        floats = tmp / ".float"
        floats.mkdir()
        sessions = {}
        for name in graphs:
            data = read_package_file(source, name)
            package_file(floats, name, exists=False).write_bytes(data)
            sessions[name] = open_session(source / name, data=data)
        feeds = _package_feeds(source, manifest, sessions, images)
        accounting = {
            name: _quantize_graph(
                floats / name, package_file(tmp, name, exists=False), feeds[name], settings,
                {**settings, "package_file": name},
            )
            for name in graphs
        }  # fmt: skip
        for name in graphs:
            (floats / name).unlink()
        floats.rmdir()
        quant = {
            **settings,
            "graphs": {n: {k: a[k] for k in ("macs", "macs_by_bits")} for n, a in accounting.items()},
        }
        if manifest["format"] == FORMAT:
            quant["routes"] = _route_accounting(manifest, accounting)
        else:
            quant["entries"] = [
                {"index": i, "macs": accounting[e["file"]]["macs"], "macs_by_bits": accounting[e["file"]]["macs_by_bits"]}
                for i, e in enumerate(manifest["entries"])
            ]  # fmt: skip
        manifest = {**manifest, "quantization": quant}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return target


def _package_feeds(
    source: Path, manifest: Mapping[str, Any], sessions: Mapping[str, Any], images: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
    """Calibration inputs of every graph (``sessions``: one per file of ``source``), from the
    checked manifest's fields only: a budget entry and a gated trunk take the images, a route
    takes what the float trunk outputs for them (its features)."""
    check_package_graphs(source, manifest, sessions)  # shapes fit: no onnxruntime error below
    feeds: dict[str, dict[str, np.ndarray]] = {}
    if manifest["format"] == FORMAT:
        trunk = manifest["trunk"]["file"]
        feeds[trunk] = {sessions[trunk].get_inputs()[0].name: images}
        features = _run_batched(sessions[trunk], feeds[trunk], len(images), source / trunk)[0]
        for r in manifest["routes"]:
            feeds[r["file"]] = {sessions[r["file"]].get_inputs()[0].name: features}
    else:
        for e in manifest["entries"]:
            feeds[e["file"]] = {sessions[e["file"]].get_inputs()[0].name: images}
    return feeds


def _run_batched(
    session: Any, inputs: Mapping[str, np.ndarray], n: int, path: Path, batch: int = 256
) -> list[np.ndarray]:
    """Every output of an onnxruntime session over ``n`` samples, run ``batch`` at a time."""
    try:
        parts = [
            session.run(None, {k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)
        ]
    except Exception as e:  # onnxruntime's own error types derive from Exception only
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path.name} failed on the calibration images ({reason}); re-export the package"
        ) from e
    return [np.concatenate([p[j] for p in parts]) for j in range(len(session.get_outputs()))]


def _route_accounting(manifest: Mapping[str, Any], accounting: Mapping[str, dict]) -> list[dict[str, Any]]:
    """Per route of a gated package: MACs per image of trunk + route graphs, split by bit widths."""
    trunk = accounting[manifest["trunk"]["file"]]
    routes = []
    for i, r in enumerate(manifest["routes"]):
        parts = (trunk, accounting[r["file"]])
        by_bits: dict[str, int] = {}
        for part in parts:
            for k, v in part["macs_by_bits"].items():
                by_bits[k] = by_bits.get(k, 0) + v
        routes.append({"index": i, "macs": sum(p["macs"] for p in parts), "macs_by_bits": by_bits})
    return routes


# --------------------------------------------------------------------------- accuracy


def _batched(fn, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate_artifact(
    path: str | os.PathLike, images: Any, labels: Any, batch_size: int = 256
) -> dict[str, Any]:
    """Top-1 accuracy (%) of an artifact on normalised ``images`` with ``labels``.

    A model file gives ``{"top1", "predictions"}``. A gated package is run by
    :class:`GatedOnnxRunner` (``top1``, ``route_counts``, ``avg_macs``) and also with every sample
    forced through each route (``route_top1``). A budget-table package is run by
    :class:`BudgetOnnxRunner`: every entry's ``entry_top1``, in manifest order.
    """
    path = Path(path)
    images, labels = _check_images(images), np.asarray(labels)
    if artifact_kind(path) == "model":
        model = OnnxModel(path)
        pred = _batched(model, images, batch_size).argmax(1)
        return {"top1": float((pred == labels).mean() * 100), "predictions": pred}
    if _read_manifest(path)["format"] == BUDGET_FORMAT:
        runner = BudgetOnnxRunner(path)
        tops = [float((_batched(m, images, batch_size).argmax(1) == labels).mean() * 100) for m in runner.models]
        return {"entry_top1": tops}
    runner = GatedOnnxRunner(path)
    parts = [runner.forward_with_routes(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    pred = np.concatenate([p[0] for p in parts]).argmax(1)
    routes = np.concatenate([p[1] for p in parts])
    forced = []
    for r in range(len(runner.routes)):
        out = _batched(lambda x, r=r: runner.forward_with_routes(x, np.full(len(x), r))[0], images, batch_size)
        forced.append(float((out.argmax(1) == labels).mean() * 100))
    return {
        "top1": float((pred == labels).mean() * 100), "predictions": pred,
        "route_counts": runner.route_counts(routes), "avg_macs": runner.avg_macs(routes), "route_top1": forced,
    }  # fmt: skip


def compare_artifacts(
    float_path: str | os.PathLike, quant_path: str | os.PathLike, images: Any, labels: Any
) -> dict[str, Any]:
    """Accuracy of the quantized artifact beside its float original on the same images.

    ``{"float": ..., "int8": ...}`` (as :func:`evaluate_artifact`, without per-sample predictions),
    ``drop`` (float minus int8 top-1, points; also per route of a gated package, ``route_drop``,
    and per entry of a budget table, ``entry_drop``) and ``agreement`` (% of samples with the same
    predicted class; model files and gated packages).
    """
    results = {}
    for name, path in (("float", float_path), ("int8", quant_path)):
        results[name] = evaluate_artifact(path, images, labels)
    f, q = results["float"], results["int8"]
    out: dict[str, Any] = {}
    if "predictions" in f:
        out["agreement"] = float((f.pop("predictions") == q.pop("predictions")).mean() * 100)
        out["drop"] = f["top1"] - q["top1"]
    if "route_top1" in f:
        out["route_drop"] = [a - b for a, b in zip(f["route_top1"], q["route_top1"], strict=True)]
    if "entry_top1" in f:
        out["entry_drop"] = [a - b for a, b in zip(f["entry_top1"], q["entry_top1"], strict=True)]
    return {**results, **out}
