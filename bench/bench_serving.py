"""Serving speed: does a narrower subnet save time in the runtimes users deploy with?

Three parts (issue 16), all timed interleaved round by round with paired ratios
(:mod:`dynaslice.serve.speed`), on this machine's CPU:

- ``widths``: resnet_small at 28x28 and ResNet-50 at 224, uniform widths x0.35/0.5/0.75/1 on
  every runtime, batch 1 and 64: efficiency = speed-up over x1 / MAC reduction (goal >= 0.8 in
  the best runtime) and the largest subnet's time against eager's (goal <= 0.5);
- ``gated``: a gated resnet_small (4 routes) with half the images on the narrowest route and half
  on the widest (forced per sample; the gate still runs), against the ideal mix -- each route's own
  static subnet on the images routed to it (goal: ideal / measured >= 0.9);
- ``budget``: a 4-entry budget table called with a different budget every call, against each
  entry's own subnet (goal >= 0.9).

Mixes are timed a cycle at a time (batch 1: one call per route or entry), the same cycle through
the static subnets as the ideal, in interleaved rounds with paired ratios (see ``_mix``).

Weights are random: speed does not depend on them, and the routing is forced.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_serving.py --threads 1 --out bench/out/serving.json

``--device cuda`` runs the same parts on the GPU (eager, CUDA graphs, onnxruntime's CUDA provider
where installed); times then include waiting for the GPU (``measure_latency`` synchronises).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial

import torch
from common import output_args, set_threads, write_results

from dynaslice import create_supernet, serve
from dynaslice.budget import BudgetEntry, BudgetNet, BudgetTable
from dynaslice.counting import count_macs
from dynaslice.gate import GatedSupernet
from dynaslice.latency import measure_latency, paired_ratio
from dynaslice.serve.speed import compare_runtimes
from dynaslice.train.bn import bn_statistics

WIDTHS = (0.35, 0.5, 0.75, 1.0)
# torch.compile is left out by default: it compiles each subnet and batch size (minutes)
DEFAULT_RUNTIMES = {"cpu": ("eager", "frozen", "onnxruntime"), "cuda": ("eager", "cudagraph", "onnxruntime")}
MODELS = {
    "resnet_small": dict(in_chans=1, num_classes=10, input_size=28),
    "resnet50": dict(num_classes=1000, input_size=224),
}


def part_widths(args: argparse.Namespace, runtimes: list[str]) -> dict:
    out = {}
    for name in args.models:
        net = create_supernet(name, **MODELS[name]).eval().to(args.device)
        archs = {f"x{w:g}": net.space.uniform(w) for w in WIDTHS}
        repeats = args.repeats if name == "resnet_small" else args.repeats_large
        rows = compare_runtimes(net, archs, runtimes, args.batch_sizes, repeats, largest="x1")
        out[name] = rows
        for r in rows:
            print(f"{name:>12} b{r['batch']:<3} {r['runtime']:>11} {r['name']:>6} {r['ms']:9.3f} ms "
                  f"speed-up {r['speedup']:5.2f} eff {r['efficiency']:.2f} vs eager {r['vs_eager'] or 1:.2f}x")  # fmt: skip
    return out


Calls = list[Callable[[], object]]  # run in order as one timed unit


def _mix(cycles: dict[int, tuple[Calls, Calls]], repeats: int) -> list[dict]:
    """Per batch size, one cycle of the mix through the served artifact against the same cycle
    through each route's / entry's own static subnet (the ideal), timed as two units in
    interleaved rounds: ideal / measured is the median of the per-round paired ratios.

    Timing whole cycles, not single calls, compares like with like: both sides run every route
    equally often (so their weights are equally warm in the caches), and a round's ratio never
    pairs a cheap route's call against an average over routes.
    """
    rows = []
    for b, (mix, ideal) in cycles.items():
        fns = {"mix": lambda calls=mix: [c() for c in calls], "ideal": lambda calls=ideal: [c() for c in calls]}
        times = measure_latency(fns, repeats=repeats)
        ratio = paired_ratio(times, "ideal", "mix")
        rows.append({"batch": b, "calls_per_cycle": len(mix), "mix_ms": 1e3 * statistics.median(times["mix"]),
                     "ideal_ms": 1e3 * statistics.median(times["ideal"]), "ideal_over_measured": ratio})  # fmt: skip
        print(f"  b{b}: mix {rows[-1]['mix_ms']:.3f} ms, ideal {rows[-1]['ideal_ms']:.3f} ms per cycle, ideal/measured {ratio:.3f}")
    return rows


def part_gated(args: argparse.Namespace, runtime: str) -> dict:
    """Half the images on the narrowest route, half on the widest. A batch-1 cycle is two calls,
    one per route; a larger batch is one call with the routes alternating over its samples, its
    ideal each route's static subnet on its half of the batch."""
    torch.manual_seed(0)
    gated = GatedSupernet(create_supernet("resnet_small", **MODELS["resnet_small"]), cut=1, routes=4).eval().to(args.device)
    served = serve.serve_gated(gated, runtime)
    ends = [0, len(gated.routes) - 1]
    statics = [serve.serve_subnet(gated, gated.routes[r], runtime) for r in ends]
    cycles = {}
    for b in args.batch_sizes:
        x = torch.randn(b, 1, 28, 28, device=args.device)
        if b == 1:
            mix = [partial(served.forward_with_routes, x, torch.tensor([r])) for r in ends]
            ideal = [partial(s, x) for s in statics]
        else:
            routes = torch.tensor([ends[i % 2] for i in range(b)])
            mix = [partial(served.forward_with_routes, x, routes)]
            ideal = [partial(s, x[routes == r]) for s, r in zip(statics, ends, strict=True)]
        cycles[b] = (mix, ideal)
    print(f"gated ({runtime}):")
    return {"runtime": runtime, "routes": [gated.routes[r].to_dict() for r in ends], "rows": _mix(cycles, args.repeats)}


def part_budget(args: argparse.Namespace, runtime: str) -> dict:
    """A different entry every call: a cycle is one call per entry (all four), the whole batch each."""
    torch.manual_seed(0)
    net = create_supernet("resnet_small", **MODELS["resnet_small"]).eval().to(args.device)
    archs = [net.space.uniform(w) for w in WIDTHS]
    entries = [BudgetEntry(bucket=i, arch=a, macs=int(count_macs(net, a)), val_accuracy=80.0 + i) for i, a in enumerate(archs)]
    budget = BudgetNet(net, BudgetTable(entries), [bn_statistics(net)] * len(entries)).eval()
    served = serve.serve_budget(budget, runtime)
    statics = [serve.serve_subnet(net, a, runtime) for a in archs]
    cycles = {}
    for b in args.batch_sizes:
        x = torch.randn(b, 1, 28, 28, device=args.device)
        mix = [partial(served, x, max_macs=e.macs) for e in entries]
        cycles[b] = (mix, [partial(s, x) for s in statics])
    print(f"budget table ({runtime}):")
    return {"runtime": runtime, "entries": len(entries), "rows": _mix(cycles, args.repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["widths", "gated", "budget"], choices=["widths", "gated", "budget"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--runtimes", default=None, help="comma-separated (default: those of DEFAULT_RUNTIMES available on --device)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=30, help="rounds (resnet_small, gated, budget)")
    ap.add_argument("--repeats-large", type=int, default=5, help="rounds for ResNet-50")
    output_args(ap, out="bench/out/serving.json", threads=1)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    have = serve.available_runtimes(args.device)
    names = args.runtimes.split(",") if args.runtimes else [r for r in DEFAULT_RUNTIMES[args.device] if r in have]
    try:
        runtimes = [serve.resolve_runtime(r, args.device) for r in names]
    except ValueError as e:
        ap.error(str(e))
    best = serve.resolve_runtime("auto", args.device)
    out: dict = {"benchmark": "serving", "device": args.device, "runtimes": runtimes, "auto": best,
                 "batch_sizes": args.batch_sizes}  # fmt: skip
    if "widths" in args.parts:
        out["widths"] = part_widths(args, runtimes)
    if "gated" in args.parts:
        out["gated"] = part_gated(args, best)
    if "budget" in args.parts:
        out["budget"] = part_budget(args, best)
    write_results(args.out, out)


if __name__ == "__main__":
    main()
