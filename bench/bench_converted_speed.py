"""Are the subnets of a *converted* model really faster? Issue 28's speed goal, measured.

For each torchvision model (random weights, no downloads) :func:`dynaslice.make_supernet` makes a
supernet; its largest, uniform x0.5 and narrowest subnets are extracted and exported to ONNX
(:func:`dynaslice.onnx_export.export_onnx`) and run on onnxruntime through
:func:`dynaslice.onnx_package.open_session`, the one session factory serving uses -- so this times
what ``dynaslice serve`` runs. The three subnets of one model and batch size are timed
interleaved round by round (:func:`dynaslice.latency.measure_latency`); the speed-up is the median
of per-round paired ratios (:func:`dynaslice.latency.paired_ratio`), and

    efficiency = speed-up over the largest / (MACs of the largest / MACs of the subnet)

is 1.0 when every saved MAC became saved time. Issue 28's goal is efficiency >= 0.8 at batch 1
and 64 for both narrower subnets of every model.

Batch 64 at 224 px takes seconds per call on one thread, so it runs fewer rounds
(``--repeats-large``). Timings are for one thread pinned to one core:

    taskset -c 1 .venv/bin/python bench/bench_converted_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from common import cpu_facts, output_args, set_threads, write_results

import dynaslice as ds
from dynaslice.latency import measure_latency, paired_ratio
from dynaslice.onnx_export import export_onnx
from dynaslice.onnx_package import open_session

GOAL = 0.8  # issue 28: speed-up / MAC reduction
def convert(name: str, size: int) -> ds.Supernet:
    """torchvision's ``name`` with random weights (seeded), as a supernet traced at ``size`` px."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups kept at full width are listed in net.kept
        return ds.make_supernet(model, torch.randn(1, 3, size, size)).eval()


def markdown(data: dict[str, Any]) -> str:
    """docs/RESULTS.md's table, from a result of this script."""
    lines = [
        "| model | batch | subnet | GMACs | ms | speed-up | MAC reduction | speed-up / MAC reduction | goal >= 0.8 |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in data["rows"]:
        met = "-" if r["met"] is None else ("met" if r["met"] else "**missed**")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['subnet']} | {r['gmacs']:.3f} | {r['ms']:.1f} | {r['speedup']:.2f} "
            f"| {r['mac_reduction']:.2f} | {r['efficiency']:.3f} | {met} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,mobilenet_v3_large,efficientnet_b0,convnext_tiny")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds at batch 1")
    p.add_argument("--repeats-large", type=int, default=5, help="interleaved rounds at batch >= 8")
    p.add_argument("--size", type=int, default=224, help="input side in pixels (small: a smoke run)")
    p.add_argument("--note", default="", help="how the machine was loaded while this ran")
    p.add_argument("--table", metavar="JSON", help="only print the Markdown table of a result file")
    output_args(p, out="bench/out/converted_speed.json", threads=1)
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    set_threads(args.threads)
    load = os.getloadavg()[0]
    facts = cpu_facts()
    print(f"{facts['cpu']} {facts['cpu_flags']}; load average at start {load:.2f}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            net = convert(name, args.size)
            shape = (3, args.size, args.size)
            archs = {
                "largest": net.space.largest(),
                "x0.5": net.space.uniform(0.5),
                "smallest": net.space.smallest(),
            }
            macs = {k: int(ds.count_macs(net, a, input_size=shape)) for k, a in archs.items()}
            sessions = {}
            for k, a in archs.items():
                path = export_onnx(net, a, Path(tmp) / f"{name}_{k}.onnx", input_size=shape)
                sessions[k] = open_session(path, threads=args.threads)
            for bs in map(int, args.batch_sizes.split(",")):
                x = np.random.default_rng(0).standard_normal((bs, *shape), dtype=np.float32)
                fns = {k: partial(s.run, None, {"input": x}) for k, s in sessions.items()}
                repeats = args.repeats if bs < 8 else args.repeats_large
                times = measure_latency(fns, repeats=repeats, warmup=1 if bs >= 8 else 3)
                for k in archs:
                    speedup = paired_ratio(times, "largest", k)
                    reduction = macs["largest"] / macs[k]
                    row = {
                        "model": name,
                        "batch": bs,
                        "subnet": k,
                        "arch": archs[k].to_dict(),
                        "gmacs": macs[k] / 1e9,
                        "ms": statistics.median(times[k]) * 1e3,
                        "rounds": repeats,
                        "speedup": speedup,
                        "mac_reduction": reduction,
                        "efficiency": speedup / reduction,
                        "goal": GOAL,
                        "met": None if k == "largest" else speedup / reduction >= GOAL,
                    }
                    rows.append(row)
                    print(
                        f"{name:>18} batch {bs:>3} {k:>8} {row['gmacs']:6.3f} GMACs {row['ms']:9.1f} ms  "
                        f"speed-up {speedup:5.2f}  MAC reduction {reduction:5.2f}  efficiency {row['efficiency']:.2f}",
                        flush=True,
                    )
    narrower = [r for r in rows if r["subnet"] != "largest"]
    note = args.note or (
        f"load average {load:.2f} at the start: another process shared the machine" if load > 1.2 else ""
    )
    affinity = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    data = {
        "benchmark": "converted_speed",
        "command": shlex.join(["taskset", "-c", affinity, ".venv/bin/python", "bench/bench_converted_speed.py",
                               *sys.argv[1:]]),
        **facts,
        "onnxruntime_threads": args.threads,
        "size": args.size,
        "load_average_at_start": load,
        "note": note,
        "goal": f"speed-up / MAC reduction >= {GOAL} for x0.5 and smallest at every batch size",
        "goal_met": all(r["met"] for r in narrower),
        "rows": rows,
    }  # fmt: skip
    write_results(args.out, data)
    print(markdown(data))


if __name__ == "__main__":
    main()
