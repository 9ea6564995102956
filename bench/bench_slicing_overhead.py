"""Latency of a subnet run sliced inside the supernet vs. its extracted static model.

Both run in one process, interleaved round by round, on this CPU; we report medians and the ratio
sliced / static (goal: <= 1.03 at every point). The original DS-Net code ran the full width with
zero-masked channels, i.e. the "sliced" subnet cost as much as the largest one.

    python bench/bench_slicing_overhead.py --out bench/out/slicing_overhead.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import torch
from common import output_args, set_threads, write_results

import dynaslice as ds
from dynaslice.latency import measure_latency, paired_ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="a 4-stage conv supernet (default resnet18)")
    p.add_argument("--ratios", default="0.25,0.5,0.75,1.0")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=30, help="rounds at batch 1 (a third at larger batches)")
    output_args(p, out="bench/out/slicing_overhead.json")
    args = p.parse_args()
    set_threads(args.threads)

    torch.manual_seed(0)
    net = ds.create_supernet(args.model).eval()
    rows = []
    for bs in map(int, args.batch_sizes.split(",")):
        x = torch.randn(bs, 3, args.size, args.size)
        repeats = args.repeats if bs < 8 else max(7, args.repeats // 3)
        for ratio in map(float, args.ratios.split(",")):
            arch = net.space.uniform(ratio)
            static = ds.extract_subnet(net, arch, input_size=(3, args.size, args.size)).eval()
            fns = {"sliced": lambda x=x, a=arch: net(x, a), "static": lambda x=x, m=static: m(x)}
            times = measure_latency(fns, repeats=repeats)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            row = {
                "batch": bs,
                "ratio": ratio,
                "arch": arch.to_dict(),
                "mmacs": ds.count_macs(net, arch, input_size=(3, args.size, args.size)) / 1e6,
                "sliced_ms": med["sliced"],
                "static_ms": med["static"],
                "sliced_over_static": paired_ratio(times, "sliced", "static"),
                "ratio_of_medians": med["sliced"] / med["static"],
                "repeats": repeats,
            }
            rows.append(row)
            print(
                f"batch {bs:>3} width {ratio:<5} {row['mmacs']:>8.1f} MMACs  sliced {med['sliced']:8.2f} ms  "
                f"static {med['static']:8.2f} ms  ratio {row['sliced_over_static']:.3f}",
                flush=True,
            )
    out = {
        "benchmark": "slicing_overhead",
        "model": args.model,
        "input": [3, args.size, args.size],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
        "max_ratio": max(r["sliced_over_static"] for r in rows),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, out)
    print(f"max ratio {out['max_ratio']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
