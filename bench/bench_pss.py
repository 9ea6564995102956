"""PSS-Net vs the uniform sandwich supernet on Fashion-MNIST: test accuracy per MACs budget.

Same recipe as the Stage-I benchmark (configs/fmnist_bench.yaml: resnet_small, 16k training
images, 2 epochs), the same soft targets for both supernets, and equal compute per step (4
subnets: largest, 2 pool / 2 random, smallest). The targets are IB (the EMA teacher), not the
paper's in-place distillation from the live largest subnet: in this 250-step budget in-place
distillation destabilises the whole supernet (bench_stage1_accuracy.py: 62-70% against 80-85%
with IB), which would compare two broken supernets. ``--set train.target=inplace`` runs the
paper's variant.

  (a) pss       PSS-Net pools; per MACs bucket the best of the ``--top-k`` highest-scored pool
                subnets on the validation split (the run's budget table);
  (b) sandwich  the uniform sandwich supernet; per bucket the best of ``--top-k`` random subnets
                of that bucket (the constraint-conditioned sampler) on the validation split --
                a random search with the same number of validation evaluations as (a);
  shared BN     (a)'s subnets with one set of BN statistics recalibrated for all of them
                together, instead of each its own (what the per-entry statistics buy);
  (c) static    ordinary networks of the uniform widths trained alone, same recipe and epochs
                (``bench_stage1_accuracy.py --variants static --out bench/out/stage1_static.json``,
                if present; shown in the bucket their MACs fall in).

Every reported subnet has BN statistics recalibrated for it alone (the config's recal_images;
for (a) the ones its budget entry stores), then top-1 on the Fashion-MNIST *test* split;
selection never sees the test split. Goal: (a) >=
(b) in every bucket. Resumable: finished trainings and selections are reused (delete the run
directory's bench_rows.json to redo a selection, e.g. after changing --top-k). Train time of
(a) includes its end-of-run budget-table selection; it is recorded by the call that trained the
supernet (``RUN/bench_train_seconds.json``; after an interrupted run, of the rest only).

    python bench/bench_pss.py                  # one seed (docs/RESULTS.md: two cores, ~11 min)
    python bench/bench_pss.py --quick          # smoke run (tiny subset, 1 epoch)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import QUICK as COMMON_QUICK
from common import quick_path, start, test_split, training_args, write_results

from dynaslice.atomic import atomic_write_json, cached_json
from dynaslice.budget import BudgetNet, BudgetTable
from dynaslice.runs import is_finished
from dynaslice.seeding import derive_seed
from dynaslice.space import Arch
from dynaslice.train import load_config, load_supernet, recalibrate_bn, train
from dynaslice.train.config import save_config
from dynaslice.train.data import eval_loader, load_split
from dynaslice.train.evaluate import subnet_accuracy
from dynaslice.train.pss import PSSSampler, macs_fn, select_budget_table

COMMON = ["train.target=ib", "train.num_subnets=4"]  # --recipe ib; --recipe config keeps the config's
SAMPLERS: dict[str, list[str]] = {"pss": ["train.sampler=pss"], "sandwich": ["train.sampler=sandwich"]}
QUICK = COMMON_QUICK + ["train.pss.estimate_samples=5000"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training_args(ap, out="bench/out/pss.json", runs="runs/bench_pss")
    ap.add_argument("--bucket-step", type=float, default=2.5, help="MMACs per bucket (default 2.5)")
    ap.add_argument("--top-k", type=int, default=3, help="validation evaluations per bucket (default 3)")
    ap.add_argument(
        "--pool-size",
        type=int,
        default=10,
        help="PSS pool capacity (default 10: 250 steps x 2 draws over ~10 buckets would never fill 50)",
    )
    ap.add_argument(
        "--train-only",
        choices=list(SAMPLERS),
        help="only train this supernet and stop (to train both at once on two cores; then run without it)",
    )
    ap.add_argument(
        "--recipe",
        choices=("ib", "config"),
        default="ib",
        help="ib: IB targets and 4 subnets per step for both supernets (the Stage-I benchmark's); "
        "config: the config's own recipe (e.g. a supernet run's config.yaml: teacher target, init_from)",
    )
    ap.add_argument(
        "--sandwich",
        default=None,
        metavar="RUN",
        help="a finished sandwich supernet run of the same config to search instead of training one "
        "(e.g. bench_accuracy.py's supernet, which starts from the same phase-1 network)",
    )
    ap.add_argument(
        "--static",
        default="bench/out/stage1_static.json",
        help="static rows (bench_stage1_accuracy.py --variants static, same recipe and epochs); "
        "no such file: no column (c)",
    )
    args = ap.parse_args()
    extra = [
        f"train.pss.bucket_step={args.bucket_step}",
        f"train.pss.select_top_k={args.top_k}",
        f"train.pss.pool_size={args.pool_size}",
    ]
    extra += (QUICK if args.quick else []) + args.set
    if args.sandwich and not is_finished(Path(args.sandwich)):
        raise SystemExit(f"--sandwich {args.sandwich}: not a finished run")
    variants = {k: (COMMON if args.recipe == "ib" else []) + v for k, v in SAMPLERS.items()}
    start(args)
    if args.quick:
        args.static = quick_path(args.static)

    runs, seconds, cfgs = {}, {}, {}
    for name, sets in variants.items():
        if args.train_only and name != args.train_only:
            continue
        cfg = load_config(args.config, sets + extra)
        run = Path(args.runs) / name
        if name == "sandwich" and args.sandwich:
            runs[name], cfgs[name], seconds[name] = Path(args.sandwich), cfg, None
            print(f"{name}: {args.sandwich} (trained elsewhere)", flush=True)
            continue
        timing = run / "bench_train_seconds.json"
        finished = is_finished(run)
        t0 = time.perf_counter()
        train(cfg, run, resume=True)  # resumes an interrupted run, skips a finished one
        if not finished:  # the time of the call that trained it (after a resume: the rest only)
            atomic_write_json(timing, {"seconds": time.perf_counter() - t0})
        seconds[name] = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
        save_config(cfg, run / "bench_config.yaml")
        runs[name], cfgs[name] = run, cfg
        print(f"{name}: trained ({_secs(seconds[name])})", flush=True)
    if args.train_only:
        return

    t = cfgs["pss"].train
    train_ds = load_split(cfgs["pss"].data, "train", t.seed)
    val = eval_loader(load_split(cfgs["pss"].data, "val", t.seed))
    test = eval_loader(test_split(cfgs["pss"], args.test_images))

    # (a) the PSS budget table (selected on val during training): its entries as deployed, each
    # with its own BN statistics (BudgetNet), on the test split
    table = BudgetTable.load(runs["pss"])

    def pss_rows() -> list[dict]:
        deployed = BudgetNet.load(runs["pss"]).eval()
        return [
            {
                "bucket": e.bucket,
                "arch": e.arch.to_dict(),
                "macs": e.macs,
                "val_accuracy": e.val_accuracy,
                "test_accuracy": subnet_accuracy(deployed.net, deployed.use(e), test),
            }
            for e in deployed.table.entries
        ]

    pss = cached_json(runs["pss"] / "bench_rows.json", pss_rows)

    # what the per-entry BN statistics buy: the same entries with one set of statistics
    # recalibrated for all of them together (rows are per layer width, so they share them)
    def shared_bn_accuracies() -> list[float]:
        net, _ = load_supernet(runs["pss"])
        archs = [Arch(r["arch"]) for r in pss]
        recalibrate_bn(
            net, list(dict.fromkeys(archs)), train_ds, t.recal_images, t.recal_batch_size, seed=t.seed
        )
        return [subnet_accuracy(net, a, test) for a in archs]

    for row, acc in zip(
        pss, cached_json(runs["pss"] / "bench_shared_bn.json", shared_bn_accuracies), strict=True
    ):
        row["test_accuracy_shared_bn"] = acc

    # (b) random search in each bucket of the sandwich supernet, same number of val evaluations
    sw_net, _ = load_supernet(runs["sandwich"])
    fn = macs_fn(sw_net)
    sampler = PSSSampler(
        sw_net.space, fn, args.bucket_step, 1, seed=t.seed, estimate_samples=t.pss.estimate_samples
    )

    def sandwich_rows() -> list[dict]:
        candidates = {}
        for e in table.entries:
            bucket = int(round(e.bucket / args.bucket_step))
            rng = np.random.default_rng(derive_seed("bench-random-search", t.seed, bucket))
            # like PSS's candidates: the largest / smallest subnet when it falls in the bucket
            extra = sampler.candidates(bucket, 0)
            n = max(e.candidates - len(extra), 1)
            candidates[e.bucket] = list(
                dict.fromkeys([sampler.sample_in_bucket(bucket, rng) for _ in range(n)] + extra)
            )
        # the library's selection, as PSS's own table was made: per bucket the best on val, each
        # entry with BN statistics recalibrated for it alone
        searched = BudgetNet(sw_net, *select_budget_table(sw_net, candidates, train_ds, val, t)).eval()
        return [
            {
                "bucket": e.bucket,
                "arch": e.arch.to_dict(),
                "macs": e.macs,
                "val_accuracy": e.val_accuracy,
                "candidates": e.candidates,
                "test_accuracy": subnet_accuracy(searched.net, searched.use(e), test),
            }
            for e in searched.table.entries
        ]

    # cached beside the benchmark's runs, not inside a --sandwich run that belongs to another one
    sandwich = cached_json(Path(args.runs) / "sandwich_search.json", sandwich_rows)

    # (c) static counterparts from the Stage-I benchmark, if it has run
    static: list[dict] = []
    if Path(args.static).is_file():
        static = json.loads(Path(args.static).read_text())["variants"].get("static", {}).get("rows", [])
    by_bucket = {round(r["macs"] / 1e6 / args.bucket_step) * args.bucket_step: r for r in static}

    lines = [
        "| bucket (MMACs) | PSS MMACs | PSS top-1 | PSS, shared BN | sandwich MMACs | sandwich top-1 | static |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    wins = 0
    for a, b in zip(pss, sandwich, strict=True):
        s = by_bucket.get(round(a["bucket"] / args.bucket_step) * args.bucket_step)
        st = f"{s['name']} {s['accuracy']:.2f} ({s['macs'] / 1e6:.2f} MMACs)" if s else "-"
        wins += a["test_accuracy"] >= b["test_accuracy"]
        lines.append(
            f"| {a['bucket']:g} | {a['macs'] / 1e6:.2f} | {a['test_accuracy']:.2f} | {a['test_accuracy_shared_bn']:.2f} | "
            f"{b['macs'] / 1e6:.2f} | {b['test_accuracy']:.2f} | {st} |"
        )
    lines.append(
        f"| train time (PSS incl. selection) | | {_secs(seconds['pss'])} | | | {_secs(seconds['sandwich'])} | |"
    )
    table_md = "\n".join(lines)
    print("\nTop-1 test accuracy (%) on Fashion-MNIST per MACs bucket (BN recalibrated per subnet):\n")
    print(table_md)
    print(f"\nPSS >= sandwich in {wins}/{len(pss)} buckets")
    write_results(
        args.out,
        {
            "config": args.config,
            "seed": t.seed,
            "quick": args.quick,
            "recipe": args.recipe,
            "sandwich_run": args.sandwich,
            "overrides": {k: v + extra for k, v in variants.items()},
            "bucket_step_mmacs": args.bucket_step,
            "top_k": args.top_k,
            "pool_size": args.pool_size,
            "test_images": args.test_images or 10000,
            "threads": torch.get_num_threads(),
            "pss": pss,
            "sandwich": sandwich,
            "static": static,
            "train_seconds": seconds,
            "pss_wins": f"{wins}/{len(pss)}",
            "table": table_md,
        },
    )


def _secs(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f} s"


if __name__ == "__main__":
    main()
