"""Serving speed: does a narrower subnet save time in the runtimes users deploy with?

Three parts (issue 16), all timed interleaved round by round with paired ratios
(:mod:`dynaslice.serve.speed`), on this machine's CPU:

- ``widths``: resnet_small at 28x28 and ResNet-50 at 224, uniform widths x0.35/0.5/0.75/1 on
  every runtime, batch 1 and 64: efficiency = speed-up over x1 / MAC reduction (goal >= 0.8 in
  the best runtime) and the largest subnet's time against eager's (goal <= 0.5);
- ``gated``: a gated resnet_small (4 routes) with half the images on the narrowest route and half
  on the widest (forced per sample; the gate still runs), against the ideal mix -- each route's own
  static subnet, timed alone, weighted by the routing (goal: ideal / measured >= 0.9);
- ``budget``: a 4-entry budget table called with a different budget every call, against each
  entry's own subnet timed alone (goal >= 0.9).

Weights are random: speed does not depend on them, and the routing is forced.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_serving.py --threads 1 --out bench/out/serving.json
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
from common import write_results

from dynaslice import create_supernet, serve
from dynaslice.budget import BudgetEntry, BudgetNet, BudgetTable
from dynaslice.gate import GatedSupernet
from dynaslice.profile import count_macs, measure_latency
from dynaslice.serve.speed import compare_runtimes
from dynaslice.train.bn import bn_statistics

WIDTHS = (0.35, 0.5, 0.75, 1.0)
MODELS = {
    "resnet_small": dict(in_chans=1, num_classes=10, input_size=28),
    "resnet50": dict(num_classes=1000, input_size=224),
}


def part_widths(args: argparse.Namespace, runtimes: list[str]) -> dict:
    out = {}
    for name in args.models:
        net = create_supernet(name, **MODELS[name]).eval()
        archs = {f"x{w:g}": net.space.uniform(w) for w in WIDTHS}
        repeats = args.repeats if name == "resnet_small" else args.repeats_large
        rows = compare_runtimes(net, archs, runtimes, args.batch_sizes, repeats, largest="x1")
        out[name] = rows
        for r in rows:
            print(f"{name:>12} b{r['batch']:<3} {r['runtime']:>11} {r['name']:>6} {r['ms']:9.3f} ms "
                  f"speed-up {r['speedup']:5.2f} eff {r['efficiency']:.2f} vs eager {r['vs_eager'] or 1:.2f}x")  # fmt: skip
    return out


def _mix(served_call, pieces: dict[str, object], xs: dict[int, torch.Tensor], repeats: int) -> list[dict]:
    """Measured (served_call) vs ideal (each piece alone, averaged as the mix uses them) per batch size."""
    rows = []
    for b, x in xs.items():
        fns = {"mix": partial(served_call, x, b), **{k: partial(p, x) for k, p in pieces.items()}}
        times = measure_latency(fns, repeats=repeats)
        ideal = [statistics.mean(times[k][i] for k in pieces) for i in range(repeats)]
        ratio = statistics.median(i / m for i, m in zip(ideal, times["mix"], strict=True))
        rows.append({"batch": b, "mix_ms": 1e3 * statistics.median(times["mix"]),
                     "ideal_ms": 1e3 * statistics.median(ideal), "ideal_over_measured": ratio,
                     "pieces_ms": {k: 1e3 * statistics.median(times[k]) for k in pieces}})  # fmt: skip
        print(f"  b{b}: mix {rows[-1]['mix_ms']:.3f} ms, ideal {rows[-1]['ideal_ms']:.3f} ms, ideal/measured {ratio:.3f}")
    return rows


def part_gated(args: argparse.Namespace, runtime: str) -> dict:
    """Half narrowest, half widest route; batch 1 alternates the two, batch 64 mixes them."""
    torch.manual_seed(0)
    gated = GatedSupernet(create_supernet("resnet_small", **MODELS["resnet_small"]), cut=1, routes=4).eval()
    served = serve.serve_gated(gated, runtime)
    ends = [0, len(gated.routes) - 1]
    statics = {f"route{r}": serve.serve_subnet(gated, gated.routes[r], runtime) for r in ends}
    xs = {b: torch.randn(b, 1, 28, 28) for b in args.batch_sizes}
    state = {"call": 0}

    def call(x: torch.Tensor, b: int) -> None:
        if b == 1:  # alternate: every other image on each route
            routes = torch.tensor([ends[state["call"] % 2]])
            state["call"] += 1
        else:
            routes = torch.tensor([ends[i % 2] for i in range(b)])
        served.forward_with_routes(x, routes)

    print(f"gated ({runtime}):")
    return {"runtime": runtime, "routes": [gated.routes[r].to_dict() for r in ends], "rows": _mix(call, statics, xs, args.repeats)}


def part_budget(args: argparse.Namespace, runtime: str) -> dict:
    """A different entry every call, cycling through all four."""
    torch.manual_seed(0)
    net = create_supernet("resnet_small", **MODELS["resnet_small"]).eval()
    archs = [net.space.uniform(w) for w in WIDTHS]
    entries = [BudgetEntry(bucket=i, arch=a, macs=int(count_macs(net, a)), val_accuracy=80.0 + i) for i, a in enumerate(archs)]
    budget = BudgetNet(net, BudgetTable(entries), [bn_statistics(net)] * len(entries)).eval()
    served = serve.serve_budget(budget, runtime)
    statics = {f"entry{i}": serve.serve_subnet(net, a, runtime) for i, a in enumerate(archs)}
    xs = {b: torch.randn(b, 1, 28, 28) for b in args.batch_sizes}
    state = {"call": 0}

    def call(x: torch.Tensor, b: int) -> None:
        served(x, max_macs=entries[state["call"] % len(entries)].macs)
        state["call"] += 1

    print(f"budget table ({runtime}):")
    return {"runtime": runtime, "entries": len(entries), "rows": _mix(call, statics, xs, args.repeats * len(entries))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["widths", "gated", "budget"], choices=["widths", "gated", "budget"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runtimes", default="eager,frozen,onnxruntime")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=30, help="rounds (resnet_small, gated, budget)")
    ap.add_argument("--repeats-large", type=int, default=5, help="rounds for ResNet-50")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/out/serving.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runtimes = [serve.resolve_runtime(r) for r in args.runtimes.split(",")]
    best = serve.resolve_runtime("auto")
    out: dict = {"benchmark": "serving", "runtimes": runtimes, "auto": best, "batch_sizes": args.batch_sizes}
    if "widths" in args.parts:
        out["widths"] = part_widths(args, runtimes)
    if "gated" in args.parts:
        out["gated"] = part_gated(args, best)
    if "budget" in args.parts:
        out["budget"] = part_budget(args, best)
    write_results(args.out, out)


if __name__ == "__main__":
    main()
