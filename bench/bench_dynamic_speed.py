"""Real speed-up of dynamic inference: is a route mix as much faster as its MACs say?

For each supernet (random weights) we build a gated supernet (default gate position, 4 evenly
spread routes) and time the real ``DynamicNet`` path with a fixed route mix: half the inputs on
the narrowest route, half on the widest (forced per sample, so the result does not depend on an
untrained gate; the gate still runs). Against the largest subnet we report

    speed-up         = time(largest) / time(dynamic)
    MAC reduction    = MACs(largest) / average MACs of the mix (gate included)
    efficiency       = speed-up / MAC reduction   (1.0: every saved MAC is saved time)

at batch 1 (one narrow and one wide image per call, each run alone) and at batch 64 (one batch,
grouped by route). Timings are interleaved round by round; speed-ups are medians of the
per-round paired ratios. The gate's cost is given as % of the narrowest route's MACs.

    OMP_NUM_THREADS=1 taskset -c 0 python bench/bench_dynamic_speed.py --threads 1   # ResNet-50, MobileNetV2
    python bench/bench_dynamic_speed.py --quick               # smoke test: a tiny model, seconds
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable

import torch
from common import output_args, set_threads, write_results

import dynaslice as ds
from dynaslice.dynamic import DynamicNet
from dynaslice.gate import GatedSupernet
from dynaslice.latency import measure_latency, paired_ratio


def workload(dyn: DynamicNet, batch: int) -> tuple[dict[str, Callable[[], object]], torch.Tensor]:
    """The timed callables at one batch size, and the route of every image they process.

    Batch 1: one narrow and one wide image per call, each run alone. Larger batches: one batch
    with alternating routes, so the grouped outputs must be scattered back into order.
    """
    gated = dyn.gated
    net, size = gated.net, gated.input_size
    narrow, wide = gated.routes[0], gated.routes[-1]  # wide is the largest subnet (checked)
    last = len(gated.routes) - 1
    if batch == 1:
        xs = [torch.randn(1, *size) for _ in range(2)]
        forced = [torch.tensor([0]), torch.tensor([last])]
        fns = {
            "largest": lambda: [net(x, wide) for x in xs],
            "dynamic": lambda: [dyn.forward_with_routes(x, r) for x, r in zip(xs, forced, strict=True)],
            "narrowest": lambda: [net(x, narrow) for x in xs],
        }
        return fns, torch.cat(forced)
    x = torch.randn(batch, *size)
    mix = torch.tensor([0 if i % 2 == 0 else last for i in range(batch)])
    fns = {
        "largest": lambda: net(x, wide),
        "dynamic": lambda: dyn.forward_with_routes(x, mix),
        "narrowest": lambda: net(x, narrow),
    }
    return fns, mix


def bench_model(
    name: str, batch_sizes: list[int], routes: int, cut: int | None, repeats: int, warmup: int
) -> dict:
    torch.manual_seed(0)
    net = ds.create_supernet(name).eval()
    gated = GatedSupernet(net, cut=cut, routes=routes)
    dyn = DynamicNet(gated)
    size = net.input_size
    narrow, wide = 0, len(gated.routes) - 1
    largest = net.space.largest()
    if gated.routes[wide] != largest:  # routes_even keeps the trunk at full width by default
        raise RuntimeError(f"{name}: the widest route {gated.routes[wide]} is not the largest subnet")
    macs_largest = ds.count_macs(net, largest)
    macs_narrowest = ds.count_macs(net, gated.routes[narrow])
    result = {
        "model": name,
        "input": list(size),
        "cut": gated.cut,
        "routes": [r.to_dict() for r in gated.routes],
        "route_mmacs": [m / 1e6 for m in gated.route_macs().tolist()],
        "gate_macs": gated.gate.macs(),
        "gate_pct_of_narrowest": 100 * gated.gate.macs() / macs_narrowest,
        "rows": [],
    }
    for bs in batch_sizes:
        fns, mix = workload(dyn, bs)
        rounds = repeats if bs < 8 else max(3, repeats // 3)  # a batch-64 round of ResNet-50 is ~40 s
        times = measure_latency(fns, repeats=rounds, warmup=warmup if bs < 8 else 1)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        avg_macs = dyn.avg_macs(mix)
        speedup = paired_ratio(times, "largest", "dynamic")
        reduction = macs_largest / avg_macs
        row = {
            "batch": bs,
            "images_per_call": 2 if bs == 1 else bs,
            "largest_ms": med["largest"],
            "dynamic_ms": med["dynamic"],
            "narrowest_ms": med["narrowest"],
            "avg_mmacs": avg_macs / 1e6,
            "largest_mmacs": macs_largest / 1e6,
            "speedup": speedup,
            "mac_reduction": reduction,
            "efficiency": speedup / reduction,
            "narrowest_speedup": paired_ratio(times, "largest", "narrowest"),
            "narrowest_mac_reduction": macs_largest / macs_narrowest,
            "repeats": rounds,
        }
        result["rows"].append(row)
        print(
            f"{name} batch {bs}: largest {med['largest']:.1f} ms, dynamic {med['dynamic']:.1f} ms, "
            f"speed-up {speedup:.2f}x for {reduction:.2f}x fewer MACs (efficiency {row['efficiency']:.2f})",
            flush=True,
        )
    return result


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | batch | largest ms | dynamic ms | speed-up | MAC reduction | efficiency "
        "| narrowest alone: speed-up / MAC red. | gate % of narrowest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for r in res["rows"]:
            lines.append(
                f"| {res['model']} | {r['batch']} | {r['largest_ms']:.1f} | {r['dynamic_ms']:.1f} "
                f"| {r['speedup']:.2f}x | {r['mac_reduction']:.2f}x | {r['efficiency']:.2f} "
                f"| {r['narrowest_speedup']:.2f}x / {r['narrowest_mac_reduction']:.2f}x "
                f"| {res['gate_pct_of_narrowest']:.4f}% |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,mobilenet_v2", help="comma-separated supernet names")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--routes", type=int, default=4, help="routes spread evenly over the MAC range")
    p.add_argument("--cut", type=int, default=None, help="gate position (default: each family's)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    output_args(p, out="bench/out/dynamic_speed.json")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: tiny models (32x32), batch 1,8, 3 rounds"
    )
    args = p.parse_args()
    if args.quick:
        args.models, args.batch_sizes = "resnet_small,mobilenet_v2_small,no_such_net", "1,8"
        args.repeats, args.warmup = 3, 1
        if args.out == p.get_default("out"):
            args.out = "bench/out/dynamic_speed_quick.json"
    set_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights must not hit slow denormal arithmetic

    known = set(ds.list_supernets())
    results = []
    for name in args.models.split(","):
        if name not in known:
            print(f"skipping {name!r}: not a registered supernet (registered: {', '.join(sorted(known))})")
            continue
        results.append(
            bench_model(
                name,
                [int(b) for b in args.batch_sizes.split(",")],
                args.routes,
                args.cut,
                args.repeats,
                args.warmup,
            )
        )
    if not results:
        raise SystemExit("no model to benchmark: none of --models is registered")
    out = {
        "benchmark": "dynamic_speed",
        "route_mix": "half narrowest, half widest (forced per sample; the gate still runs)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    write_results(args.out, out)
    print()
    print(markdown(results))


if __name__ == "__main__":
    main()
