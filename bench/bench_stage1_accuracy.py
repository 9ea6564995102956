"""Stage-I accuracy on Fashion-MNIST: one resnet_small recipe, six ways to train it.

Variants (each a set of overrides of configs/fmnist_bench.yaml):

  labels    sandwich rule, every subnet learns the labels
  inplace   in-place distillation from the largest subnet (US-Nets)
  ib        in-place bootstrapping from the EMA teacher (DS-Net++, our default)
  ieb       in-place ensemble bootstrapping (DS-Net; the ensemble uses this step's random subnets)
  ib_mvco   IB with multi-view consistency (two views per image, teacher averaged over both)
  static    one ordinary network per width, trained alone with labels (the baseline)

Every variant sees the same images for the same number of epochs (MvCo sees two augmented
views of each). After training, BN statistics are recalibrated (2000 training images, eval
preprocessing, cumulative) for each reported width, and top-1 accuracy is measured on the
Fashion-MNIST *test* split. Budget: the whole set trains in <= 60 min on 2 CPU cores (see the
sizing in the config's comment and in the report of issue 5).

    python bench/bench_stage1_accuracy.py                 # the full benchmark (~1 hour)
    python bench/bench_stage1_accuracy.py --quick         # smoke run (a minute or two)
    python bench/bench_stage1_accuracy.py --variants ib static --set train.epochs=3
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from common import QUICK, start, test_split, training_args, write_results

from dynaslice.train import evaluate, load_config, load_supernet, train
from dynaslice.train.config import from_dict, save_config
from dynaslice.train.data import eval_loader

VARIANTS: dict[str, list[str]] = {
    "labels": ["train.target=labels"],
    "inplace": ["train.target=inplace"],
    "ib": ["train.target=ib"],
    "ieb": ["train.target=ieb"],
    "ib_mvco": ["train.target=ib", "train.mvco=true"],
    "static": ["train.target=labels", "train.static_widths=[0.35,0.5,0.75,1.0]"],
}



def test_rows(run: Path, test_images: int, seed: int) -> list[dict]:
    """Test accuracy of a finished run from its BN-recalibrated weights."""
    net, meta = load_supernet(run / "recalibrated.safetensors")
    archs = {name: net.space.validate(a) for name, a in meta["recalibrated"].items()}
    cfg = from_dict(meta["config"])
    test = test_split(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed)), test_images)
    return evaluate(net, archs, eval_loader(test), input_size=net.input_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training_args(ap, out="bench/out/stage1_accuracy.json", runs="runs/bench_stage1")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    start(args)
    extra = (QUICK if args.quick else []) + args.set

    results: dict[str, dict] = {}
    for name in args.variants:
        cfg = load_config(args.config, VARIANTS[name] + extra)
        run = Path(args.runs) / name
        t0 = time.perf_counter()
        train(cfg, run, resume=True)  # resumes an interrupted variant, skips a finished one
        seconds = time.perf_counter() - t0
        runs = [run / f"static-x{w:g}" for w in cfg.train.static_widths] if cfg.train.static_widths else [run]
        rows = [r for sub in runs for r in test_rows(sub, args.test_images, cfg.train.seed)]
        results[name] = {"rows": rows, "train_seconds": seconds, "overrides": VARIANTS[name] + extra}
        summary = ", ".join(f"{r['name']} {r['accuracy']:.2f}%" for r in rows)
        print(f"{name}: {summary} ({seconds:.0f} s)", flush=True)
        save_config(cfg, run / "bench_config.yaml")

    widths = sorted({r["name"] for v in results.values() for r in v["rows"]}, key=lambda n: float(n[1:]))
    macs = {r["name"]: r["macs"] for v in results.values() for r in v["rows"]}
    lines = [
        "| width | MMACs | " + " | ".join(results) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in results) + " |",
    ]
    for w in widths:
        acc = []
        for v in results.values():
            hit = [r["accuracy"] for r in v["rows"] if r["name"] == w]
            acc.append(f"{hit[0]:.2f}" if hit else "-")
        lines.append(f"| {w} | {macs[w] / 1e6:.2f} | " + " | ".join(acc) + " |")
    lines.append(
        "| train time (s) | | " + " | ".join(f"{v['train_seconds']:.0f}" for v in results.values()) + " |"
    )
    table = "\n".join(lines)
    print("\nTop-1 test accuracy (%) on Fashion-MNIST, BN recalibrated:\n")
    print(table)
    write_results(
        args.out,
        {
            "config": args.config,
            "quick": args.quick,
            "test_images": args.test_images or 10000,
            "threads": torch.get_num_threads(),
            "variants": results,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
