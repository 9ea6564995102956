"""One tool's conversion of a list of models, for bench/bench_coverage.py (not run by hand).

    python bench/_coverage_worker.py TOOL CACHE_DIR TIMEOUT_S SUITE/NAME [SUITE/NAME ...]

TOOL is ``dynaslice`` (run with the project's venv) or ``torch_pruning`` / ``modelopt`` (run with
``.venv-peers``, which has no dynaslice: so this file imports only torch, torchvision and timm at
the top). Every tool gets the *same* network: built here by one function, seeded, with random
weights and BatchNorm/LayerNorm statistics and affine parameters moved off their defaults (a
layer whose statistics were sliced wrongly then changes the output), in eval mode, at the same
input. Each model's result is written to ``CACHE_DIR/TOOL/SUITE__NAME.json`` as soon as it is
known, so the caller can resume, and can tell which model a crashed worker was on (the first
one with no file). A model that runs past TIMEOUT_S is stopped by SIGALRM and recorded as such.
One process for many models because importing torch, torchvision and timm costs 5-20 s here.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

NUM_CLASSES = 10
SMALL = (3, 64, 64)
BATCH = 2


class Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no ``except Exception`` in a tool swallows it."""


def _alarm(signum, frame):
    raise Timeout


# --------------------------------------------------------------------------- the same model for every tool


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm statistics and affine parameters away from their defaults (as tests/test_make_supernet does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def build(suite: str, name: str) -> nn.Module:
    """The network, random weights (nothing is downloaded), 10 classes, eval mode."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. torchvision's note that inception's init is slow
        if suite == "torchvision":
            import torchvision

            model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
        elif suite == "timm":
            import timm

            model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
        else:
            raise ValueError(f"unknown suite {suite!r}")
    return randomised(model)


def default_size(suite: str, model: nn.Module) -> tuple[int, int, int]:
    if suite == "timm":
        return tuple(model.pretrained_cfg["input_size"])
    return (3, 299, 299) if type(model).__name__ == "Inception3" else (3, 224, 224)


def input_size(suite: str, model: nn.Module) -> tuple[int, int, int]:
    """3x64x64 where the model runs on it and returns [batch, classes], else its default size."""
    try:
        with torch.no_grad():
            y = model(torch.randn(BATCH, *SMALL))
        if isinstance(y, torch.Tensor) and tuple(y.shape) == (BATCH, NUM_CLASSES):
            return SMALL
    except Exception:
        pass
    return default_size(suite, model)


def example(size: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(BATCH, *size, generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def macs(model: nn.Module, size: tuple[int, ...]) -> int:
    """MACs per image, counted like dynaslice.counting.module_macs (FLOPs / 2 of convs and matmuls),
    on a real batch of 1 (the peers' modules need not run on the meta device)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *size))
    return counter.get_total_flops() // 2


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:400]


# --------------------------------------------------------------------------- the tools


def engine_state() -> dict[str, str]:
    """Which make_supernet measured a row: the commit and a digest of the engine's files as they
    were (the working tree may hold uncommitted changes while a long run goes on)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "dynaslice" / "graph").glob("*.py"))
    files += [root / "dynaslice" / "models" / "converted.py", root / "dynaslice" / "nn" / "converted.py"]
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in files if f.exists())).hexdigest()[:12]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return {"commit": head.stdout.strip(), "engine_sha1": digest}


def run_dynaslice(model: nn.Module, x: torch.Tensor, size: tuple[int, ...], row: dict[str, Any]) -> None:
    """make_supernet; largest == model; narrowest MACs / full; extracted == slice; ONNX == torch."""
    import dynaslice as ds
    from dynaslice.counting import count_module_macs
    from dynaslice.graph import GraphError
    from dynaslice.onnx_export import export_module
    from dynaslice.onnx_package import open_session

    row["engine"] = engine_state()
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            net = ds.make_supernet(model, x)
        except (GraphError, ValueError) as e:  # a refusal, meant to be one line
            row.update(status="refused", reason=str(e), one_line="\n" not in str(e).strip())
            return
    row["convert_s"] = round(time.perf_counter() - t, 2)
    notes = [str(w.message) for w in caught if "full width" in str(w.message)]
    row.update(status="converted", groups=len(net.space.dims), kept=len(net.kept))
    row["kept_note"] = notes[0] if notes else None
    smallest = net.space.smallest()

    def largest() -> None:
        with torch.no_grad():
            row["largest_rel_err"] = rel_err(net(x, net.space.largest()), model(x))

    def extract() -> None:
        with torch.no_grad():
            state["sliced"] = net(x, smallest)
            state["sub"] = ds.extract_subnet(net, smallest, size)
            row["extract_rel_err"] = rel_err(state["sub"](x), state["sliced"])

    def count() -> None:
        full = count_module_macs(model, size)
        row.update(macs_full=full, macs_narrowest=count_module_macs(state["sub"], size))
        row["narrowest_macs_ratio"] = row["macs_narrowest"] / full

    def onnx() -> None:
        """dynaslice's default exporter (TorchScript); where it cannot export an op at this input
        (adaptive pooling to a size that does not divide the input's), the torch.export-based
        one, and the row says so."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = export_module(state["sub"], Path(tmp) / "narrowest.onnx", size)
                row["onnx_exporter"] = "torchscript"
            except Exception as e:
                row["onnx_torchscript_error"] = one_line(e)
                path = export_module(state["sub"], Path(tmp) / "narrowest.onnx", size, exporter="dynamo")
                row["onnx_exporter"] = "dynamo"
            session = open_session(path)
            got = session.run(None, {"input": x.numpy()})[0]
        row["onnx_rel_err"] = rel_err(torch.from_numpy(got), state["sliced"])

    # each check on its own: one that fails (an exporter's limit) leaves the others measured
    state: dict[str, Any] = {}
    for step in (largest, extract, count, onnx):
        if step in (count, onnx) and "sub" not in state:
            continue
        try:
            step()
        except Exception as e:
            row[f"{step.__name__}_error"] = one_line(e)


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers producing the classes (kept whole, as make_supernet keeps the output)."""
    return [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
        or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)
    ]


def run_torch_pruning(model: nn.Module, x: torch.Tensor, size: tuple[int, ...], row: dict[str, Any]) -> None:
    """Torch-Pruning's documented one call: MetaPruner (it builds the DependencyGraph) with 50 %
    of each group's channels, magnitude importance, the classifier ignored; then the pruned
    model must run and still return [batch, classes]. No per-family hints (attention heads)."""
    import torch_pruning as tp

    full = macs(model, size)
    t = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
            ignored_layers=classifier_layers(model),
        )  # fmt: skip
        pruner.step()
        with torch.no_grad():
            y = model(x)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (BATCH, NUM_CLASSES):
            raise RuntimeError(f"the pruned model returns {getattr(y, 'shape', type(y).__name__)}")
        row.update(macs_full=full, macs_pruned=macs(model, size))
    except Exception as e:
        row.update(status="failed", reason=one_line(e))
        return
    row.update(status="converted", convert_s=round(time.perf_counter() - t, 2))
    row["pruned_macs_ratio"] = row["macs_pruned"] / full


def run_modelopt(model: nn.Module, x: torch.Tensor, size: tuple[int, ...], row: dict[str, Any]) -> None:
    """ModelOpt FastNAS: ``mtn.convert(model, mode=[("fastnas", config)])`` with DS-Net's grid
    (0.35:0.05:1.0, multiples of 8, as make_supernet's default); "converts" = no error, >= 1
    searchable hparam, and the max subnet equals the model (1e-5); MACs of the min subnet."""
    import modelopt.torch.nas as mtn
    from modelopt.torch.opt.utils import named_hparams

    ratios = [round(0.35 + 0.05 * i, 2) for i in range(14)]
    rule = {"*": {"channels_ratio": ratios, "channel_divisor": 8}}
    linear = {"*": {"features_ratio": ratios, "feature_divisor": 8}}
    config = {"nn.Conv1d": rule, "nn.Conv2d": rule, "nn.Conv3d": rule, "nn.Linear": linear}
    with torch.no_grad():
        want = model(x)
    full = macs(model, size)
    t = time.perf_counter()
    try:
        net = mtn.convert(model, mode=[("fastnas", config)])
        searchable = [n for n, h in named_hparams(net, configurable=True)]
        row["hparams"] = len(searchable)
        if not searchable:
            raise RuntimeError("the converted model has no searchable hparam")
        mtn.sample(net, max)
        with torch.no_grad():
            row["largest_rel_err"] = rel_err(net(x), want)
        mtn.sample(net, min)
        row.update(macs_full=full, macs_narrowest=macs(net, size))
    except Exception as e:
        row.update(status="failed", reason=one_line(e))
        return
    row["convert_s"] = round(time.perf_counter() - t, 2)
    row["narrowest_macs_ratio"] = row["macs_narrowest"] / full
    row["status"] = "converted" if row["largest_rel_err"] <= 1e-5 else "wrong"
    if row["status"] == "wrong":
        row["reason"] = f"max subnet differs from the model (relative error {row['largest_rel_err']:.2g})"


TOOLS = {"dynaslice": run_dynaslice, "torch_pruning": run_torch_pruning, "modelopt": run_modelopt}


def measure(tool: str, key: str, timeout_s: int) -> dict[str, Any]:
    suite, name = key.split("/", 1)
    row: dict[str, Any] = {"tool": tool, "suite": suite, "model": name}
    t = time.perf_counter()
    signal.alarm(timeout_s)
    try:
        model = build(suite, name)
        size = input_size(suite, model)
        row["input_size"] = list(size)
        TOOLS[tool](model, example(size), size, row)
    except Timeout:
        row.update(status="timeout", reason=f"over {timeout_s} s")
    except Exception as e:  # not a refusal: a bug in the tool (or in building the model)
        row.update(status="error", reason=one_line(e), where=traceback.format_exc(limit=-3).splitlines()[-3:])
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - t, 1)
    return row


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic (this file runs without dynaslice, so without dynaslice.atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main() -> None:
    tool, cache, timeout_s, keys = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    signal.signal(signal.SIGALRM, _alarm)
    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "1")))
    for key in keys:
        row = measure(tool, key, timeout_s)
        write_json(cache / tool / (key.replace("/", "__") + ".json"), row)
        print(f"{tool} {key}: {row['status']} ({row['seconds']} s) {row.get('reason', '')[:150]}", flush=True)


if __name__ == "__main__":
    main()
