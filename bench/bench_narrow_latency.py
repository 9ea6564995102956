"""Why resnet_small's narrow subnets save less time than MACs: time at equal-ish MACs.

Times (onnxruntime only, interleaved rounds, medians) resnet_small at 28x28: x0.35 (channels
8, 12, 24, 44), an arch with more MACs but channel counts that are multiples of 8 (8, 16, 24, 56),
x0.5 and x1. If time followed MACs, the second would be 27 % slower than x0.35.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_narrow_latency.py --out bench/out/narrow_latency.json
"""

from __future__ import annotations

import argparse

from common import output_args, set_threads, write_results

from dynaslice import create_supernet
from dynaslice.serve.speed import compare_runtimes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    output_args(ap, out="bench/out/narrow_latency.json", threads=1)
    args = ap.parse_args()
    set_threads(args.threads)
    net = create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=28).eval()
    x035 = net.space.uniform(0.35)
    archs = {
        "x0.35": x035,
        "mult8": x035.__class__(s1=8, s2=16, s3=24, s4=56),
        "x0.5": net.space.uniform(0.5),
        "x1": net.space.uniform(1.0),
    }
    rows = compare_runtimes(net, archs, ["onnxruntime"], [1, 64], args.repeats, largest="x1")
    for r in rows:
        print(f"b{r['batch']:<3} {r['name']:6s} {r['macs'] / 1e6:6.2f} MMACs {r['ms']:8.3f} ms eff {r['efficiency']:.2f}")
    write_results(args.out, {"benchmark": "narrow_latency", "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
