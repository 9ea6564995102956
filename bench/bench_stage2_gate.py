"""Stage II on Fashion-MNIST: the gated resnet_small at several MAC targets vs its static routes.

1. Stage I: the recipe of configs/fmnist_bench.yaml (IB, sandwich of 4, 16k images x 2 epochs:
   the budget of one variant of bench_stage1_accuracy.py) on a *gated* resnet_small: the gate
   sits before stage 1 (``model.gate.cut=1``: the stem and first stage run at full width, so
   the 4 evenly spread routes cost 36%..100% of the widest), its attention head trains with the
   supernet.
2. BN recalibration for the 4 routes (2000 training images, eval preprocessing), once.
3. Stage II once per target (default 0.4, 0.6, 0.8 of the widest route): frozen backbone,
   SGS + task CE through straight-through Gumbel routes + the MACs penalty toward the target.
4. Test split: accuracy and average MACs per image of each gated model (argmax routing), next
   to each route run as a fixed subnet of the same supernet, and -- when
   bench/out/stage1_accuracy.json (or ``_quick``) exists -- the static networks trained alone
   by the Stage-I benchmark.

Resumable: a finished part (Stage I, the recalibration, each target, each test evaluation) is
skipped on the next run; an interrupted Stage I resumes from its checkpoint.

    python bench/bench_stage2_gate.py               # the full benchmark (about 30 min on 2 cores)
    python bench/bench_stage2_gate.py --quick       # smoke run (a minute or two)
    python bench/bench_stage2_gate.py --targets 0.5 0.7 --set stage2.epochs=3
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from common import QUICK, quick_path, start, test_split, training_args, write_results

from dynaslice.atomic import cached_json
from dynaslice.train import evaluate_gated, load_config, load_supernet, save_model_file, train, train_gate
from dynaslice.train.checkpoint import latest_checkpoint
from dynaslice.train.config import apply_override, from_dict
from dynaslice.train.data import eval_loader
from dynaslice.train.stage2 import recalibrate_routes

STAGE1 = ["model.gate.enabled=true", "model.gate.cut=1", "model.gate.routes=4", "train.target=ib"]
STAGE2 = ["stage2.epochs=2"]


def test_eval(model_file: Path, test_images: int) -> dict:
    net, meta = load_supernet(model_file)
    cfg = from_dict(meta["config"])
    test = test_split(cfg, test_images)
    return evaluate_gated(net, eval_loader(test), test.num_classes, net.input_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training_args(ap, out="bench/out/stage2_gate.json", runs="runs/bench_stage2")
    ap.add_argument(
        "--targets", nargs="+", type=float, default=[0.4, 0.6, 0.8], help="fractions of the widest route"
    )
    args = ap.parse_args()
    start(args)
    extra = STAGE1 + STAGE2 + (QUICK + ["stage2.epochs=1"] if args.quick else []) + args.set
    # Stage-II knobs stay out of the Stage-I config: changing them must not invalidate Stage I
    stage1_set = [a for a in extra if not a.startswith("stage2.")]
    stage2_set = [a for a in extra if a.startswith("stage2.")]
    stage1_json = Path(quick_path("bench/out/stage1_accuracy.json") if args.quick else "bench/out/stage1_accuracy.json")
    runs = Path(args.runs)
    timings: dict[str, float] = {}

    # 1. Stage I (a finished run is skipped; an interrupted one resumes)
    cfg = load_config(args.config, stage1_set)
    stage1 = runs / "stage1"
    t0 = time.perf_counter()
    if not (stage1 / "final_eval.json").is_file():
        train(cfg, stage1, resume=True)
    timings["stage1"] = time.perf_counter() - t0

    # 2. BN statistics for the routes, once for every target
    recal = stage1 / "routes-recalibrated.safetensors"
    if not recal.is_file():
        net, meta = load_supernet(latest_checkpoint(stage1))
        recalibrate_routes(net, from_dict(meta["config"]))
        meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
        meta["recalibrated"] = {k: a.to_dict() for k, a in net.named_routes().items()}
        save_model_file(recal, {f"model.{k}": v for k, v in net.state_dict().items()}, meta)
    static_routes = cached_json(stage1 / "test_eval.json", lambda: test_eval(recal, args.test_images))[
        "routes"
    ]

    # 3. Stage II per target, 4. its test evaluation
    gated: dict[str, dict] = {}
    for target in args.targets:
        name = f"t{target:g}"
        out = runs / f"gate-{name}"
        t0 = time.perf_counter()
        if not (out / "final_eval.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # an interrupted Stage II (minutes) starts over
            net, meta = load_supernet(recal)
            cfg2 = from_dict(meta["config"])
            for assignment in [*stage2_set, f"stage2.target_macs={target}"]:
                cfg2 = apply_override(cfg2, assignment)
            train_gate(net, cfg2, out, meta, recalibrate=False)
        timings[name] = time.perf_counter() - t0
        model_file = latest_checkpoint(out) / "model.safetensors"
        result = cached_json(out / "test_eval.json", lambda f=model_file: test_eval(f, args.test_images))
        gated[name] = {"target": target, **result}
        print(
            f"gate {name}: top-1 {result['accuracy']:.2f}% at {result['avg_macs'] / 1e6:.2f} MMACs, "
            f"routes {result['histogram']}, SGS agreement {result['sgs']['agreement']:.1f}%",
            flush=True,
        )

    static_alone = []
    if stage1_json.is_file():
        variants = json.loads(stage1_json.read_text()).get("variants", {})
        static_alone = variants.get("static", {}).get("rows", [])

    widest = max(r["macs"] for r in static_routes)
    rows = [
        (g["avg_macs"], f"gated, target {g['target']:g}", g["accuracy"], str(g["histogram"]))
        for g in gated.values()
    ]
    rows += [(r["macs"], f"{r['name']} of the supernet (static)", r["accuracy"], "") for r in static_routes]
    rows += [
        (r["macs"], f"static {r['name']} trained alone (Stage-I bench)", r["accuracy"], "")
        for r in static_alone
    ]
    lines = [
        "| model | MMACs per image | of widest | top-1 (%) | routes (narrowest first) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for macs, label, acc, hist in sorted(rows):
        lines.append(f"| {label} | {macs / 1e6:.2f} | {macs / widest:.2f} | {acc:.2f} | {hist} |")
    table = "\n".join(lines)
    print("\nTop-1 test accuracy vs average MACs on Fashion-MNIST (BN recalibrated for the routes):\n")
    print(table)
    write_results(
        args.out,
        {
            "config": args.config,
            "overrides": extra,
            "quick": args.quick,
            "test_images": args.test_images or 10000,
            "threads": torch.get_num_threads(),
            "gated": gated,
            "static_routes": static_routes,
            "static_alone": static_alone,
            "static_alone_source": str(stage1_json) if static_alone else None,
            "seconds": timings,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
