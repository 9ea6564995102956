"""Is a narrower subnet really faster? Speed-up over the largest subnet divided by MAC reduction.

For each model and batch size, the largest subnet and every uniform width run sliced inside the
supernet (the way dynamic inference runs them), interleaved round by round in one process; we
report median latencies, the median of per-round paired speed-ups, and ``efficiency = (t_largest / t_width) / (macs_largest / macs_width)``.
1.0 means wall-clock time falls exactly as fast as MACs; the goal is >= 0.8 for ResNet-50 and
ViT-S. Depthwise-heavy MobileNetV2 is memory-bound on CPUs, so it is reported as measured.

Two forms of every subnet (``--forms``):

- ``sliced``: run inside the supernet, eager PyTorch -- what dynamic inference runs;
- ``frozen``: the extracted subnet (:func:`dynaslice.extract_subnet`) scripted and frozen with
  ``torch.jit.optimize_for_inference``: BatchNorm folded into the convs, conv+ReLU fused, oneDNN
  weight layouts prepacked -- the CPU deployment form of a chosen subnet. It separates what the
  narrow shapes cost in eager PyTorch's per-op overhead from what the kernels cost.

    python bench/bench_zoo_speed.py --threads 1 --out bench/out/zoo_speed.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import warnings
from functools import partial
from pathlib import Path

import torch
from common import output_args, set_threads, write_results

import dynaslice as ds
from dynaslice.latency import measure_latency, paired_ratio
from dynaslice.torch_export import extract_subnet


def frozen(net: torch.nn.Module, arch: ds.Arch, size: tuple[int, ...]) -> torch.jit.ScriptModule:
    """The extracted subnet, scripted and frozen for CPU inference (see the module docstring)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch 2.14 marks TorchScript deprecated; it still runs
        return torch.jit.optimize_for_inference(torch.jit.script(extract_subnet(net, arch, size).eval()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,mobilenet_v2,vit_small")
    p.add_argument("--ratios", default="0.35,0.5,0.75")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument(
        "--repeats", type=int, default=12, help="rounds at batch 1 (a third of that at batch >= 8)"
    )
    p.add_argument("--size", type=int, default=224)
    p.add_argument(
        "--forms", default="sliced,frozen", help="sliced (eager, in the supernet), frozen (exported)"
    )
    output_args(p, out="bench/out/zoo_speed.json")
    args = p.parse_args()
    set_threads(args.threads)

    rows = []
    for name in args.models.split(","):
        if name not in ds.list_supernets():
            print(f"skipping {name}: not registered")
            continue
        torch.manual_seed(0)
        net = ds.create_supernet(name).eval()
        size = (3, args.size, args.size)
        archs = {"largest": net.space.largest()}
        archs.update({f"x{r}": net.space.uniform(float(r)) for r in args.ratios.split(",")})
        macs = {k: ds.count_macs(net, a, input_size=size) for k, a in archs.items()}
        forms = args.forms.split(",")
        models = {(f, k): frozen(net, a, size) for f in forms if f == "frozen" for k, a in archs.items()}
        for bs in map(int, args.batch_sizes.split(",")):
            x = torch.randn(bs, *size)
            fns = {}
            for f in forms:
                for k, a in archs.items():
                    fns[f"{f}/{k}"] = partial(net, x, a) if f == "sliced" else partial(models[f, k], x)
            times = measure_latency(
                fns, repeats=args.repeats if bs < 8 else max(3, args.repeats // 3), warmup=2
            )
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            for f, k in ((f, k) for f in forms for k in archs):
                speedup = paired_ratio(times, f"{f}/largest", f"{f}/{k}")
                reduction = macs["largest"] / macs[k]
                row = {
                    "model": name,
                    "form": f,
                    "batch": bs,
                    "subnet": k,
                    "arch": a.to_dict(),
                    "mmacs": macs[k] / 1e6,
                    "ms": med[f"{f}/{k}"],
                    "speedup": speedup,
                    "mac_reduction": reduction,
                    "efficiency": speedup / reduction,
                }
                rows.append(row)
                print(
                    f"{name:>13} {f:>6} batch {bs:>3} {k:>8} {row['mmacs']:>8.0f} MMACs {row['ms']:>9.1f} ms  "
                    f"speed-up {speedup:5.2f}  MAC reduction {reduction:5.2f}  efficiency {row['efficiency']:.2f}",
                    flush=True,
                )
    out = {
        "benchmark": "zoo_speed",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
