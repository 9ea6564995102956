"""What every benchmark script shares: the flags of a training benchmark, thread settings,
smoke-test sizing, the test split, mean +- standard error, and results written atomically with
the machine they were measured on.

Benchmarks run as ``python bench/bench_X.py`` (this folder is then first on ``sys.path``), write
one JSON file each and are quoted with their command in docs/RESULTS.md, where
bench/trace_figures.py checks every figure against it. Nothing here belongs in the library:
only benchmarks use it (the test split is the library's, :func:`dynaslice.pipeline.test_split`).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dynaslice.atomic import atomic_write_json
from dynaslice.pipeline import test_split

# --quick: a smoke run of a benchmark in a minute or two (checks it runs, says nothing)
QUICK = [
    "data.train_size=512",
    "data.val_size=256",
    "data.batch_size=64",
    "train.epochs=1",
    "train.recal_images=256",
    "train.recal_batch_size=128",
]


__all__ = [
    "QUICK", "machine", "mean_se", "output_args", "quick_path", "set_threads", "start", "test_split",
    "training_args", "write_results",
]  # fmt: skip


def training_args(ap: argparse.ArgumentParser, *, out: str, runs: str) -> None:
    """The flags of a benchmark that trains, spelled once: ``--config``, ``--set``, ``--quick``,
    ``--runs``, ``--out``, ``--test-images`` and ``--threads`` (apply them with :func:`start`)."""
    ap.add_argument("--config", default="configs/fmnist_bench.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny subset, 1 epoch (says nothing)")
    ap.add_argument("--runs", default=runs, help="where the runs are trained (resumable)")
    ap.add_argument("--test-images", type=int, default=0, help="evaluate on the first N test images (0: all)")
    output_args(ap, out=out)


def output_args(ap: argparse.ArgumentParser, *, out: str, threads: int | None = None) -> None:
    """``--out FILE`` and ``--threads N`` (None: torch's default; timings pass 1), as every
    benchmark spells them; :func:`set_threads` applies ``--threads``."""
    ap.add_argument("--out", default=out, help=f"results JSON (default {out})")
    default = "torch's own" if threads is None else threads
    ap.add_argument("--threads", type=int, default=threads, help=f"intra-op threads (default: {default})")


def start(args: argparse.Namespace) -> None:
    """Apply :func:`training_args`' flags: the thread count, and for ``--quick`` 500 test images
    (unless given), its own run directory and results file, so a smoke run never mixes with a
    benchmark's."""
    set_threads(args.threads)
    if args.quick:
        args.test_images = args.test_images or 500
        args.runs += "_quick"
        args.out = quick_path(args.out)


def quick_path(path: str | Path) -> str:
    """Where ``--quick`` writes (or reads) what a benchmark run writes at ``path``."""
    return str(path).replace(".json", "_quick.json")


def set_threads(threads: int | None) -> None:
    """``--threads N``: N intra-op threads (timings pin them; None leaves torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """Mean and standard error of the mean over seeds (``se`` None for one value), as every
    results file and table reports them."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se, "n": len(values)}


def fmt_mean_se(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± se`` of a :func:`mean_se` record (times ``scale``), ``-`` where there is none."""
    if not stat:
        return "-"
    se = f" ± {stat['se'] * scale:.{digits}f}" if stat["n"] > 1 and stat["se"] is not None else ""
    return f"{stat['mean'] * scale:.{digits}f}{se}"


def goal_table(goals: dict[str, dict[str, Any]]) -> str:
    """The Markdown table of paired gaps over seeds (``{name: {seeds, val, test[, part]}}``), with
    the issue's part column where the goals name one."""
    part = any("part" in g for g in goals.values())
    head = ("| part " if part else "") + "| comparison | seeds | val gap (points) | test gap (points) |"
    rule = ("| --- " if part else "") + "| --- | ---: | ---: | ---: |"
    lines = [head, rule]
    for name, g in goals.items():
        first = f"| ({g['part']}) " if part else ""
        lines.append(f"{first}| {name} | {len(g['seeds'])} | {fmt_mean_se(g['val'])} | {fmt_mean_se(g['test'])} |")
    return "\n".join(lines)


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_vpopcntdq", "amx_tile", "amx_int8")
"""The instruction sets that decide which kernels onnxruntime, oneDNN and our 1-bit kernel run."""


def cpu_facts() -> dict[str, Any]:
    """The CPU's name and which of :data:`CPU_FLAGS` it has, from /proc/cpuinfo (the platform's
    processor name and no flags where there is none): a timing holds for the CPU it was taken on."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name or platform.processor() or platform.machine(), "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def machine() -> dict[str, Any]:
    """Where a figure was measured: recorded in every results file."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def write_results(path: str | Path, data: dict[str, Any]) -> None:
    """The benchmark's JSON (with the machine facts), written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**data, "environment": machine()}, indent=1)
    print(f"wrote {path}")
