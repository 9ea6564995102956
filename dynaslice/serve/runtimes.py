"""Runtimes: one plain-torch module (an extracted subnet, a gated model's trunk or route, a budget
entry) made fast for inference, behind one call ``piece(x) -> output``.

Every runtime prepares a module once, when an artifact is loaded, and keeps what it built
(scripted graphs, inference sessions, CUDA graphs): nothing is created per call.

- ``eager``: PyTorch eager under ``torch.inference_mode`` -- the reference.
- ``frozen``: TorchScript, frozen and passed through ``torch.jit.optimize_for_inference``: BN
  folded into the convolutions, conv+ReLU fused, oneDNN weight prepacking on CPU.
- ``compile``: ``torch.compile`` (``mode="reduce-overhead"`` on CUDA, which adds CUDA graphs);
  the first call of each input shape compiles (seconds to minutes).
- ``onnxruntime``: the module exported to ONNX and run by an onnxruntime session (all graph
  optimisations; CPU, or CUDA when onnxruntime's CUDA provider is installed). Tensors cross as
  numpy arrays on the host.
- ``cudagraph`` (CUDA only): one CUDA graph per input shape, captured on first use and replayed;
  group sizes are padded to a power of two, so a piece holds at most ``log2(max batch) + 1``
  graphs.

Why several: eager PyTorch is bound by per-op dispatch on small inputs (batch 1, 28x28) and by
launch latency on GPUs, so a narrower subnet saves less time than MACs; the deployment runtimes
remove most of that overhead and turn the saved MACs into saved time (docs/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..onnx_export import export_module
from ..onnx_package import open_session, providers_for

Output = torch.Tensor | tuple[torch.Tensor, ...]
Piece = Callable[[torch.Tensor], Output]

RUNTIMES = ("eager", "frozen", "compile", "onnxruntime", "cudagraph")
# the default ("auto") per device, then the next when one is not installed: on CPU the fastest
# measured (docs/RESULTS.md, "Serving speed"); on CUDA graphs, which remove the launch overhead
# that bounds eager GPU inference (not yet timed: bench/gpu_check.sh is the prepared check)
PREFERRED = {"cpu": ("onnxruntime", "frozen", "eager"), "cuda": ("cudagraph", "eager")}


def available_runtimes(device: str | torch.device = "cpu") -> list[str]:
    """The runtimes that can run on ``device`` here (installed packages, hardware)."""
    kind = torch.device(device).type
    out = ["eager", "frozen", "compile"]
    if importlib.util.find_spec("onnxruntime") is not None:
        if kind == "cpu" or "CUDAExecutionProvider" in _ort().get_available_providers():
            out.append("onnxruntime")
    if kind == "cuda" and torch.cuda.is_available():
        out.append("cudagraph")
    return out


def resolve_runtime(name: str, device: str | torch.device = "cpu") -> str:
    """``name`` checked against what runs on ``device``; ``auto`` is the preferred one there."""
    kind = torch.device(device).type
    have = available_runtimes(device)
    if name == "auto":
        return next(r for r in PREFERRED.get(kind, ("eager",)) if r in have)
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}: choose auto or one of {', '.join(RUNTIMES)}")
    if name not in have:
        why = "needs a CUDA device" if name == "cudagraph" else f"is not available for {kind} here"
        raise ValueError(f"runtime {name!r} {why}; available: {', '.join(have)}")
    return name


def prepare(module: nn.Module, example: torch.Tensor, runtime: str) -> Piece:
    """``module`` (plain torch, put in eval mode) made ready to run on ``runtime``, built once.

    ``example``: an input of the right shape, dtype and device (its batch size does not matter).
    """
    module = module.eval().to(example.device)
    builders: dict[str, Callable[[nn.Module, torch.Tensor], Piece]] = {
        "eager": _eager,
        "frozen": _frozen,
        "compile": _compiled,
        "onnxruntime": _onnxruntime,
        "cudagraph": CudaGraphPiece,
    }
    return builders[resolve_runtime(runtime, example.device)](module, example)


# --------------------------------------------------------------------------- the runtimes


def _eager(module: nn.Module, example: torch.Tensor) -> Piece:
    def run(x: torch.Tensor) -> Output:
        with torch.inference_mode():
            return module(x)

    return run


def _frozen(module: nn.Module, example: torch.Tensor) -> Piece:
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.14 but works, and torch is pinned
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(scripted))
    with torch.inference_mode():
        frozen(example)  # the first call profiles and optimises the graph: keep it out of serving
    return _eager(frozen, example)


def _compiled(module: nn.Module, example: torch.Tensor) -> Piece:
    mode = "reduce-overhead" if example.device.type == "cuda" else None
    return _eager(torch.compile(module, mode=mode, dynamic=False), example)


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def ort_session(
    path: str | Path, device: torch.device, threads: int | None = None, data: bytes | None = None
) -> Any:
    """:func:`dynaslice.onnx_package.open_session` (every graph optimisation, no spinning) on ``device``'s
    provider, with ``threads`` intra-op threads (default: as many as torch uses here); ``data``:
    the file's bytes when a package's reader already read them by the package rule
    (:func:`dynaslice.onnx_package.read_package_file`). A damaged file is one ``ValueError``."""
    threads = threads or torch.get_num_threads()
    return open_session(Path(path), providers_for(device.type), threads=threads, data=data)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """``x`` as the contiguous host array an onnxruntime session reads (no copy when it already is one)."""
    return np.ascontiguousarray(x.detach().cpu().numpy())


class OrtPiece:
    """An onnxruntime session behind the torch call signature (host numpy in between)."""

    def __init__(self, session: Any, device: torch.device):
        self.session, self.device = session, device
        self.input = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> Output:
        outs = self.session.run(None, {self.input: to_numpy(x)})
        tensors = tuple(torch.from_numpy(o).to(self.device) for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors


def _onnxruntime(module: nn.Module, example: torch.Tensor) -> Piece:
    with torch.inference_mode():
        out = module(example[:1])
    n_out = len(out) if isinstance(out, tuple) else 1
    with tempfile.TemporaryDirectory() as tmp:  # the session keeps the model in memory
        path = export_module(module, Path(tmp) / "piece.onnx", tuple(example.shape[1:]),
                             output_names=[f"output{i}" for i in range(n_out)])  # fmt: skip
        session = ort_session(path, example.device)
    return OrtPiece(session, example.device)


class CudaGraphPiece:
    """CUDA graphs of a module, one per (padded) input shape, captured once and replayed."""

    def __init__(self, module: nn.Module, example: torch.Tensor):
        if example.device.type != "cuda":
            raise ValueError("the cudagraph runtime needs inputs on a CUDA device")
        self.module = module
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, Output]] = {}

    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, Output]:
        static_in = torch.zeros_like(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # warm-up: cuDNN picks its kernels outside the capture
                self.module(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = self.module(static_in)
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> Output:
        n = x.shape[0]
        padded = 1 << (n - 1).bit_length()  # BN is per sample in eval mode: padding rows is harmless
        key = (padded, *x.shape[1:])
        if key not in self.graphs:
            self.graphs[key] = self._capture(x.new_zeros(key))
        graph, static_in, static_out = self.graphs[key]
        static_in[:n].copy_(x)
        graph.replay()
        if isinstance(static_out, tuple):
            return tuple(o[:n].clone() for o in static_out)
        return static_out[:n].clone()


def example_input(input_size: Sequence[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """A batch-2 input to prepare pieces with (batch 1 lets some exporters fix the batch size)."""
    return torch.zeros(2, *input_size, device=device)
