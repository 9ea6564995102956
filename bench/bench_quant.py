"""Quantization benchmarks (issue 18): int8 on onnxruntime, FDDA at 4 bits, quantized packages.

``--mode int8`` (a): W8A8 static QDQ on onnxruntime. Accuracy of every uniform width of a trained
checkpoint, float vs int8 calibrated on ``--calib`` real training images (goal: drop <= 0.5
points at every width), and latency of float vs int8 sessions at batch 1 and 64 for
resnet_small 28x28 (the checkpoint's largest subnet) and ResNet-50 224x224 (random weights,
noise-calibrated: speed does not depend on the weights), timed interleaved round by round and
reported as medians and the median of per-round paired ratios.

``--mode fdda`` (b): the paper's claim at 4 bits with fake quantization, W4A4 and W4A4 with 8-bit
first/last layers. Four calibration-data choices on the same 10 real images (one per class,
drawn per seed) and equal iterations (``--calib-steps`` range steps, ``--steps`` distillation
steps): ``fdda`` (real + FDDA generator), ``gdfq`` (real + generator with the global BN loss
only), ``real`` (the 10 real images alone, plain PTQ) and ``noise`` (real + Gaussian noise).
Test accuracy per seed, then mean +- standard error over seeds; goal: FDDA at least 1 point
above the best of the others. ``ranges_only`` is each student before fine-tuning.

``--mode packages`` (c): a gated ONNX package (``dynaslice export --gated``) and a PSS run's
budget table (each entry exported with its own BN statistics) quantized to int8 with
``--calib`` real images; float vs int8 accuracy per route / per entry (goal: within 0.5 points).

    python bench/bench_quant.py --mode int8 --run RUN/recalibrated.safetensors --threads 1 \\
        --out bench/out/quant_int8.json
    python bench/bench_quant.py --mode fdda --run RUN/static-x1/recalibrated.safetensors \\
        --seeds 0,1,2 --threads 1 --out bench/out/quant_fdda.json
    python bench/bench_quant.py --mode packages --gated-package PKG --budget PSS_RUN --threads 1 \\
        --out bench/out/quant_packages.json

Sizing of (b): with the defaults (``--gen-steps 500 --steps 200 --calib-steps 100``, all 10 000
test images) one seed -- 2 generators, 8 students, 16 evaluations -- is estimated at about 30
minutes on one quiet core: a generator step took 1.9 s (FDDA, two batches) / 0.9 s (GDFQ), a
student step 1.1 s (two sources) and a fake-quant pass over the test set 85 s on the shared
development machine at load ~5 on 2 cores, about 2.5x slower than a quiet core. ``--test-images
5000`` halves the evaluation share (about a third of the total).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dynaslice as ds
from dynaslice.atomic import atomic_write_json
from dynaslice.data import EvalTransform, InMemoryDataset, load_dataset
from dynaslice.onnx_export import export_onnx
from dynaslice.profile import measure_latency, paired_ratio
from dynaslice.quant import (
    FDDAConfig,
    NoiseImages,
    RealImages,
    bn_centres,
    calibration_images,
    compare_artifacts,
    quantize_artifact,
    quantize_model,
    train_generator,
)
from dynaslice.quant.calibration import GeneratorImages
from dynaslice.quant.fakequant import FinetuneConfig, calibrate_ranges, finetune
from dynaslice.train import load_supernet
from dynaslice.train.config import load_config
from dynaslice.train.data import load_split

METHODS = ("fdda", "gdfq", "real", "noise")


def datasets(args: argparse.Namespace) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train, test): of a run's ``config.yaml`` (``--config``) or the dataset ``--dataset``."""
    if args.config:
        cfg = load_config(args.config)
        return load_split(cfg.data, "train"), load_split(cfg.data, "test")
    return load_dataset(args.dataset), load_dataset(args.dataset, split="test")


def test_split(test: InMemoryDataset, n: int) -> tuple[np.ndarray, np.ndarray]:
    n = min(n, len(test)) if n > 0 else len(test)
    return EvalTransform(test.mean, test.std)(test.images[:n]).numpy(), test.labels[:n].numpy()


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- (a) int8


def int8_accuracy(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    net, _ = load_supernet(args.run)
    net.eval()
    train, test = datasets(args)
    images = calibration_images(RealImages.from_dataset(train, args.calib, seed=0), args.calib)
    x, y = test_split(test, args.test_images)
    rows = []
    for width in args.widths:
        arch = net.space.uniform(width)
        f = export_onnx(net, arch, work / f"x{width:g}.onnx")
        q = quantize_artifact(f, work / f"x{width:g}_int8.onnx", images, {"kind": "real"})
        r = compare_artifacts(f, q, x, y)
        rows.append({"width": width, "arch": arch.to_dict(), "macs": ds.count_macs(net, arch), **r})
        print(
            f"x{width:g}: float {r['float']['top1']:.2f} int8 {r['int8']['top1']:.2f} drop {r['drop']:+.2f}"
        )
    return rows


def latency_pair(f: Path, q: Path, shape: tuple[int, ...], batch: int, repeats: int, threads: int) -> dict:
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    sessions = {"float": session(f, threads), "int8": session(q, threads)}
    fns = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for k, s in sessions.items()}
    times = measure_latency(fns, repeats=repeats, warmup=2)
    return {
        "batch": batch,
        "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "int8_over_float": paired_ratio(times, "int8", "float"),
        "times_s": times,
    }


def int8_latency(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    net, _ = load_supernet(args.run)
    models = [("resnet_small", net.eval(), net.space.largest(), tuple(net.input_size))]
    if not args.skip_resnet50:
        torch.manual_seed(0)
        big = ds.create_supernet("resnet50", num_classes=1000).eval()
        models.append(("resnet50", big, big.space.largest(), (3, 224, 224)))
    rows = []
    for name, model, arch, shape in models:
        f = export_onnx(model, arch, work / f"{name}_lat.onnx", input_size=shape)
        noise = calibration_images(NoiseImages(shape), 8 if shape[-1] > 64 else 64)
        q = quantize_artifact(f, work / f"{name}_lat_int8.onnx", noise, {"kind": "noise"})
        for batch in args.batches:
            repeats = args.repeats if batch == 1 else max(3, args.repeats // 4)
            r = latency_pair(f, q, shape, batch, repeats, args.threads)
            rows.append({"model": name, "input": list(shape), **r})
            print(f"{name} batch {batch}: {r['median_ms']} int8/float {r['int8_over_float']:.3f}")
    return rows


# --------------------------------------------------------------------------- (b) FDDA at 4 bits


def fdda_seed(args: argparse.Namespace, teacher: torch.nn.Module, seed: int) -> dict[str, Any]:
    train, test = datasets(args)
    x, y = (torch.from_numpy(a) for a in test_split(test, args.test_images))
    real = RealImages.from_dataset(train, train.num_classes, seed=seed, per_class=True)
    centres = bn_centres(teacher, real.images, real.labels, train.num_classes)
    size, channels = train.images.shape[-1], train.images.shape[1]
    sources, timing = {"real": [real], "noise": [real, NoiseImages((channels, size, size))]}, {}
    for kind in ("fdda", "gdfq"):
        t0 = time.perf_counter()
        cfg = FDDAConfig(steps=args.gen_steps, fdda=kind == "fdda")
        gen = train_generator(teacher, train.num_classes, size, channels, cfg, centres, seed)
        timing[f"generator_{kind}_s"] = time.perf_counter() - t0
        sources[kind] = [real, GeneratorImages(gen, kind)]
    results: dict[str, Any] = {"seed": seed, "correct_centres": int(centres.correct.sum()), **timing}
    for setting, first_last in (("W4A4", None), ("W4A4-F8L8", 8)):
        for method in METHODS:
            t0 = time.perf_counter()
            student = quantize_model(teacher, 4, 4, first_last)
            rng = torch.Generator().manual_seed(seed)
            calibrate_ranges(student, teacher, sources[method], args.calib_steps, 16, rng)
            before = accuracy(student, x, y)
            cfg = FinetuneConfig(steps=args.steps, calib_steps=0, lr=args.lr)
            finetune(student, teacher, sources[method], cfg, seed)
            after = accuracy(student, x, y)
            results[f"{setting}/{method}"] = {
                "ranges_only": before,
                "top1": after,
                "s": time.perf_counter() - t0,
            }
            print(
                f"seed {seed} {setting} {method}: ranges only {before:.2f}, fine-tuned {after:.2f}",
                flush=True,
            )
    return results


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean() * 100)


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for setting in ("W4A4", "W4A4-F8L8"):
        for method in METHODS:
            vals = [s[f"{setting}/{method}"]["top1"] for s in seeds]
            se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
            out[f"{setting}/{method}"] = {"mean": statistics.fmean(vals), "se": se}
        gaps = [
            s[f"{setting}/fdda"]["top1"] - max(s[f"{setting}/{m}"]["top1"] for m in METHODS[1:])
            for s in seeds
        ]
        se = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else None
        out[f"{setting}/fdda_minus_best_other"] = {"mean": statistics.fmean(gaps), "se": se}
    return out


def mode_fdda(args: argparse.Namespace) -> dict[str, Any]:
    net, _ = load_supernet(args.run)
    teacher = ds.extract_subnet(net.eval(), net.space.largest()).eval()
    x, y = (torch.from_numpy(a) for a in test_split(datasets(args)[1], args.test_images))
    seeds = [fdda_seed(args, teacher, s) for s in args.seeds]
    return {"teacher_top1": accuracy(teacher, x, y), "seeds": seeds, "summary": summarise(seeds)}


# --------------------------------------------------------------------------- (c) packages


def mode_packages(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    train, test = datasets(args)
    images = calibration_images(RealImages.from_dataset(train, args.calib, seed=0), args.calib)
    x, y = test_split(test, args.test_images)
    out: dict[str, Any] = {}
    if args.gated_package:
        q = quantize_artifact(args.gated_package, work / "gated_int8", images, {"kind": "real"})
        out["gated"] = compare_artifacts(args.gated_package, q, x, y)
        print("gated:", {k: out["gated"][k] for k in ("drop", "route_drop")})
    if args.budget:
        from dynaslice.budget import BudgetNet

        budget = BudgetNet.load(args.budget).eval()
        rows = []
        for i, entry in enumerate(budget.table.entries):
            f = export_onnx(budget.net, budget.use(entry), work / f"entry{i}.onnx")
            q = quantize_artifact(f, work / f"entry{i}_int8.onnx", images, {"kind": "real"})
            rows.append({"bucket": entry.bucket, "macs": entry.macs, **compare_artifacts(f, q, x, y)})
            print(f"budget entry {i} ({entry.macs / 1e6:.1f} MMACs): drop {rows[-1]['drop']:+.2f}")
        out["budget"] = rows
    if not out:
        raise SystemExit("--mode packages needs --gated-package and/or --budget")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("int8", "fdda", "packages"), required=True)
    p.add_argument("--run", help="trained checkpoint (modes int8 and fdda)")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--config", type=Path, help="a run's config.yaml: take its data (overrides --dataset)")
    p.add_argument(
        "--widths", type=lambda s: [float(v) for v in s.split(",")], default=[0.35, 0.5, 0.75, 1.0]
    )
    p.add_argument("--calib", type=int, default=256, help="real calibration images for int8")
    p.add_argument("--test-images", type=int, default=0, help="test images to evaluate on (0: all)")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64])
    p.add_argument("--repeats", type=int, default=20, help="latency rounds at batch 1 (a quarter at 64)")
    p.add_argument("--skip-resnet50", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--gen-steps", type=int, default=500)
    p.add_argument("--steps", type=int, default=200, help="distillation steps per student")
    p.add_argument("--calib-steps", type=int, default=100, help="activation-range steps per student")
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    p.add_argument("--gated-package", type=Path)
    p.add_argument("--budget", type=Path, help="a PSS run directory (budget table)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode in ("int8", "fdda") and not args.run:
        raise SystemExit(f"--mode {args.mode} needs --run (a trained checkpoint)")
    result: dict[str, Any] = {
        "mode": args.mode,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.mode == "int8":
            result["accuracy"] = int8_accuracy(args, work)
            if not args.skip_latency:
                result["latency"] = int8_latency(args, work)
        elif args.mode == "fdda":
            result.update(mode_fdda(args))
        else:
            result.update(mode_packages(args, work))
    result["wall_s"] = time.perf_counter() - t0
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
