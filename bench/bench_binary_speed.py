"""Issue 30 items 3-4: the binary small ResNet on the 1-bit kernel against the same network in
float32 and int8 on onnxruntime, one thread, batch 1 and 64; and each binary conv against the
same conv in int8.

Networks (28x28x1 input, random weights with random BatchNorm statistics: speed does not depend
on the values): :func:`dynaslice.binary.models.binary_resnet_small` with ``PlainBinaryConv2d``
exported by :func:`dynaslice.binary.packed.export_binary` and run by ``BinaryRunner``; the same
graph with ``conv=None`` (full precision) exported to ONNX, and that graph quantized by the
project's int8 path (:func:`dynaslice.quant.quantize_artifact`: static QDQ, per-channel int8
weights, uint8 activations, noise-calibrated). Each run takes float32 NCHW and gives logits.

Per layer: every distinct binary conv shape of the network (cin, cout, stride, input side), the
binary layer as it runs in the network (sign packing + XNOR-popcount + counts x scale x folded
BN + residual + hardtanh) against a one-conv int8 ONNX graph (Conv + BN + residual Add + hardtanh,
QDQ-quantized, so it too quantizes its float input and dequantizes its output). Both take the
float stream and give it back: the binary layer packs its signs inside the call.

Timing: every candidate of a comparison is called in turn within each round, ratios are medians
of per-round paired ratios (:func:`dynaslice.latency.paired_ratio`), of wall-clock and (``cpu_``)
of the process's CPU time: on a shared core a long call (batch 64) is descheduled for other
processes' turns, which the wall-clock counts and the CPU time does not. One thread everywhere: onnxruntime sessions with one
intra-op thread, torch and the BLAS under numpy (the runner's stem and classifier matmuls) set to
one thread before numpy loads. Run it pinned to one core:

    taskset -c 0 .venv/bin/python bench/bench_binary_speed.py --out bench/out/binary_speed.json

``--note`` records how the machine was loaded (say whether the other core was busy).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS: one thread, like the sessions

import argparse  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import cpu_facts, write_results  # noqa: E402
from torch import nn  # noqa: E402

from dynaslice.binary import kernel  # noqa: E402
from dynaslice.binary.layers import PlainBinaryConv2d  # noqa: E402
from dynaslice.binary.models import binary_resnet_small  # noqa: E402
from dynaslice.binary.packed import BinaryRunner, export_binary  # noqa: E402
from dynaslice.latency import paired_ratio  # noqa: E402
from dynaslice.onnx_export import export_module  # noqa: E402
from dynaslice.onnx_package import open_session  # noqa: E402
from dynaslice.quant import quantize_artifact  # noqa: E402

SHAPE = (1, 28, 28)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine (a trained network's are not 0/1), then eval."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def session_fn(session: Any, x: np.ndarray):
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def timed(fns: dict[str, Any], repeats: int, warmup: int = 3) -> dict[str, Any]:
    """Wall-clock and CPU seconds of each call, the candidates interleaved round by round (as
    :func:`dynaslice.latency.measure_latency`, which records wall-clock only). The process's CPU time
    (every thread of it, so a runtime's own threads would count too) is what a call costs the
    core; on a shared core the wall-clock also holds the time other processes ran."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {
        "median_ms": {k: statistics.median(v) * 1e3 for k, v in wall.items()},
        "cpu_median_ms": {k: statistics.median(v) * 1e3 for k, v in cpu.items()},
        "times_s": wall,
        "cpu_times_s": cpu,
    }


def ratios(r: dict[str, Any], pairs: list[tuple[str, str]]) -> None:
    """Median paired ratios ``num_over_den`` of wall-clock and (``cpu_``) of CPU time, into ``r``."""
    for num, den in pairs:
        r[f"{num}_over_{den}"] = paired_ratio(r["times_s"], num, den)
        r[f"cpu_{num}_over_{den}"] = paired_ratio(r["cpu_times_s"], num, den)


def whole_network(work: Path, batches: list[int], repeats: int, path: str) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    binary = randomise(binary_resnet_small(PlainBinaryConv2d))
    fp = randomise(binary_resnet_small(None))
    manifest = export_binary(binary, work / "binary", input_size=SHAPE)
    runner = BinaryRunner(work / "binary", path=path)
    f32 = export_module(fp, work / "fp32.onnx", SHAPE)
    noise = np.random.default_rng(1).standard_normal((64, *SHAPE)).astype(np.float32)
    int8 = quantize_artifact(f32, work / "int8.onnx", noise, {"kind": "noise"})
    sessions = {"float32": open_session(f32, threads=1), "int8": open_session(int8, threads=1)}
    sizes = {
        **manifest["sizes"],
        "float32_onnx_bytes": f32.stat().st_size,
        "int8_onnx_bytes": int8.stat().st_size,
    }
    sizes["float32_onnx_over_binary"] = round(sizes["float32_onnx_bytes"] / sizes["binary_bytes"], 2)
    sizes["int8_onnx_over_binary"] = round(sizes["int8_onnx_bytes"] / sizes["binary_bytes"], 2)
    rows = []
    for batch in batches:
        x = np.random.default_rng(2).standard_normal((batch, *SHAPE)).astype(np.float32)
        fns = {"binary": lambda x=x: runner(x), **{k: session_fn(s, x) for k, s in sessions.items()}}
        r = timed(fns, repeats if batch == 1 else max(5, repeats // 4))
        ratios(r, [("int8", "binary"), ("float32", "binary"), ("int8", "float32")])
        rows.append({"batch": batch, **r})
        print(f"network batch {batch}: {fmt(r['median_ms'])}  int8/binary {r['int8_over_binary']:.2f} "
              f"(cpu {r['cpu_int8_over_binary']:.2f})  float32/binary {r['float32_over_binary']:.2f} "
              f"(cpu {r['cpu_float32_over_binary']:.2f})")  # fmt: skip
    return rows, sizes


class ConvLayer(nn.Module):
    """One binary conv's float counterpart as it sits in the network: hardtanh(bn(conv(x)) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        from dynaslice.binary.models import PoolPadShortcut

        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.shortcut = PoolPadShortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.hardtanh(self.bn(self.conv(x)) + self.shortcut(x))


def per_layer(work: Path, batches: list[int], repeats: int, path: str) -> list[dict]:
    shapes = [(16, 16, 1, 28), (16, 32, 2, 28), (32, 32, 1, 14), (32, 64, 2, 14), (64, 64, 1, 7),
              (64, 128, 2, 7), (128, 128, 1, 4)]  # fmt: skip
    rows = []
    gen = torch.Generator().manual_seed(3)
    for cin, cout, stride, side in shapes:
        layer = randomise(ConvLayer(cin, cout, stride))
        f = export_module(layer, work / f"conv{cin}_{cout}_{stride}.onnx", (cin, side, side))
        calib = np.random.default_rng(4).standard_normal((32, cin, side, side)).astype(np.float32)
        q = open_session(quantize_artifact(f, work / f"conv{cin}_{cout}_{stride}_int8.onnx", calib), threads=1)
        w = torch.where(torch.rand(cout, cin, 3, 3, generator=gen) < 0.5, -1, 1).to(torch.int8).numpy()
        conv = kernel.pack_weights(w, stride, 1)
        a, b = np.full(cout, 0.01, np.float32), np.zeros(cout, np.float32)
        shortcut = "identity" if stride == 1 and cin == cout else "pool"
        for batch in batches:
            x = np.random.default_rng(5).standard_normal((batch, cin, side, side)).astype(np.float32)
            h = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # the runner's stream is NHWC already
            fns = {
                "binary": lambda h=h, conv=conv, a=a, b=b, sc=shortcut: kernel.binary_layer(
                    h, conv, a, b, "hardtanh", None, sc, path=path
                ),
                "int8": session_fn(q, x),
            }
            r = timed(fns, repeats if batch == 1 else max(5, repeats // 4))
            ratios(r, [("int8", "binary")])
            rows.append({"cin": cin, "cout": cout, "stride": stride, "side": side, "batch": batch, **r})
            print(f"conv {cin}->{cout} s{stride} {side}x{side} batch {batch}: {fmt(r['median_ms'])}  "
                  f"int8/binary {r['int8_over_binary']:.2f} (cpu {r['cpu_int8_over_binary']:.2f})")  # fmt: skip
    return rows


def fmt(ms: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f} ms" for k, v in ms.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/out/binary_speed.json")
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=60, help="rounds at batch 1 (a quarter, at least 5, at larger batches)")
    p.add_argument("--path", default=None, help="force a kernel path (default: the fastest this CPU has)")
    p.add_argument("--skip-layers", action="store_true", help="only the whole network")
    p.add_argument("--note", default="", help="how the machine was loaded while this ran")
    args = p.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    path = kernel.resolve_path(args.path)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        network, sizes = whole_network(work, batches, args.repeats, path)
        layers = [] if args.skip_layers else per_layer(work, batches, args.repeats, path)
    affinity = sorted(os.sched_getaffinity(0))
    write_results(args.out, {
        "command": shlex.join(["taskset", "-c", ",".join(map(str, sorted(os.sched_getaffinity(0)))), ".venv/bin/python", "bench/bench_binary_speed.py", *sys.argv[1:]]),  # fmt: skip
        "cpu": cpu_facts()["cpu"], "kernel_path": path, "supported_paths": kernel.supported_paths(),
        "cpu_affinity": affinity, "load_average_at_end": os.getloadavg(), "note": args.note,
        "threads": 1, "input": list(SHAPE), "network": network, "layers": layers, "sizes": sizes,
    })  # fmt: skip


if __name__ == "__main__":
    main()
