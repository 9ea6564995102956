"""Which fine-tuning settings of ``configs/prune.yaml`` make the documented pruning commands give
a network worth keeping (issue 33): l1, White-Box and 1xN at the preset's budget, on the
validation split.

Each method runs as ``dynaslice prune`` runs it (:mod:`dynaslice.prune.run`: the same config, the
same targets as README.md's commands: l1 ``--target-params 0.5``, White-Box ``--target-macs 14M``,
1xN ``prune.n=8``, ``prune.sparsity=0.5``) with the candidate's ``--set`` overrides. One thing is
shared that the CLI would train per command: l1 and 1xN prune the same trained base, which depends
on ``train.seed`` and on ``train.epochs - prune.finetune_epochs`` only, so it is trained once per
(seed, length) under ``--runs``/seedS/base-E and reused. Rows (val and test top-1, costs) are
cached per (candidate, seed, method), so a killed screen continues where it stopped. Nothing is
selected on the test split; it is reported beside val.

    python bench/prune_preset.py --name lr0.05 --seeds 0 --methods l1 --set prune.finetune_lr=0.05
    python bench/prune_preset.py --summary    # every candidate in --out, mean over seeds
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from common import mean_se, set_threads, test_split, write_results

from dynaslice.atomic import cached_json
from dynaslice.prune import (
    model_accuracy,
    onexn_prune,
    prune_l1,
    train_base,
    train_from_scratch,
    whitebox_prune,
)
from dynaslice.prune.phases import pretrain_epochs
from dynaslice.prune.run import full_network, resolve_targets
from dynaslice.train import load_config
from dynaslice.train.data import eval_loader

# method -> the README command's settings (bench/prune_readme_commands.py runs the commands themselves)
METHODS = {
    "l1": ["prune.method=l1", "prune.target_params=0.5"],
    "whitebox": ["prune.method=whitebox", "prune.target_macs=14000000"],
    "onexn": ["prune.method=onexn", "prune.n=8", "prune.sparsity=0.5"],
    # the yardsticks trained from scratch: l1's widths (its uniform ratio depends on the target only)
    # and the widths White-Box's vote chose (the same candidate and seed)
    "scratch_l1": ["prune.method=scratch", "prune.target_params=0.5"],
    "scratch_wb": ["prune.method=scratch", "prune.target_macs=14000000"],
}


def run_method(method: str, seed: int, sets: list[str], root: Path, threads: int) -> dict[str, Any]:
    """One method with the candidate's overrides at one seed; its row (scratch_*: after its method's row)."""
    cfg = load_config("prune", [f"train.seed={seed}", f"train.threads={threads}", *METHODS[method], *sets])
    cfg.validate()
    model, size, _classes = full_network(cfg)
    macs, params = resolve_targets(cfg, model, size)
    p, run_dir = cfg.prune, root / method
    t0 = time.perf_counter()
    if method == "scratch_l1":
        result = train_from_scratch(model, size, target_macs=macs, target_params=params, include="internal",
                                    seed=seed, cfg=cfg, run_dir=run_dir, resume=True)  # fmt: skip
    elif method == "scratch_wb":
        widths = json.loads((root / "whitebox.json").read_text())["widths"]
        result = train_from_scratch(
            model, size, widths=widths, seed=seed, cfg=cfg, run_dir=run_dir, resume=True
        )
    elif method == "whitebox":
        result = whitebox_prune(model, size, _classes, macs, cfg, run_dir, lam=p.lam, min_keep=p.min_keep,
                                include=p.include or "internal", resume=True)  # fmt: skip
    else:
        # the base is what the CLI trains in RUN/base; its config is the preset at this seed and length
        length = pretrain_epochs(cfg)
        # (the candidate's overrides but the method's and fine-tuning's, which the base does not see)
        kept = [s for s in sets if not s.startswith("prune.") or s.startswith("prune.finetune_epochs=")]
        # finetune_lr pinned at the value the first bases were trained under (the base never reads
        # it; the engine refuses to resume a run whose config differs in any key)
        pinned = [f"train.seed={seed}", f"train.threads={threads}", "prune.finetune_lr=0.01", *kept]
        base_cfg = load_config("prune", pinned)
        base = train_base(model, base_cfg, root.parent / f"base-{length:g}", resume=True)
        if method == "l1":
            result = prune_l1(base, size, target_macs=macs, target_params=params, include=p.include or "internal",
                              cfg=cfg, run_dir=run_dir, resume=True)  # fmt: skip
        else:
            result = onexn_prune(
                base, size, p.n, p.sparsity, p.rearrange, cfg=cfg, run_dir=run_dir, resume=True
            )
    seconds = time.perf_counter() - t0
    row = {k: v for k, v in result.summary().items() if k not in ("info", "input_size")}
    row["seconds"] = round(seconds, 1)
    row["test_accuracy"] = model_accuracy(result.model, eval_loader(test_split(cfg, 0)))
    return row


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Per candidate and method: val and test top-1 mean +- SE over its seeds."""
    out = {}
    for name, cand in data["candidates"].items():
        for method in METHODS:
            rows = [r[method] for r in cand["seeds"].values() if method in r]
            if rows:
                out[f"{name} {method}"] = {
                    "seeds": len(rows),
                    **{k: mean_se([r[f"{k}_accuracy"] for r in rows]) for k in ("val", "test")},
                }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", help="the candidate's name (its rows in --out)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="the candidate's overrides"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument(
        "--summary", action="store_true", help="print every candidate's mean over seeds (Markdown)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default="runs/prune_preset")
    ap.add_argument("--out", default="bench/out/prune_preset_screen.json")
    args = ap.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"candidates": {}}
    if args.summary:  # the Markdown table of docs/PRUNING.md
        print(
            "| candidate | method | seeds | val top-1 (%) | test top-1 (%) |\n| --- | --- | ---: | ---: | ---: |"
        )
        for key, s in summarise(data).items():
            cells = [
                f"{s[k]['mean']:.2f}" + (f" ± {s[k]['se']:.2f}" if s["seeds"] > 1 else "")
                for k in ("val", "test")
            ]
            print(f"| {' | '.join(key.split())} | {s['seeds']} | {' | '.join(cells)} |")
        return
    if not args.name:
        ap.error("give --name (a candidate) or --summary")
    set_threads(args.threads)
    cand = data["candidates"].setdefault(args.name, {"set": args.set, "seeds": {}})
    if cand["set"] != args.set:
        ap.error(f"candidate {args.name} was run with --set {cand['set']}; choose another --name")
    cand["command"] = shlex.join(["python", *sys.argv])
    for seed in args.seeds:
        for method in args.methods:
            root = Path(args.runs) / f"seed{seed}" / args.name
            row = cached_json(
                root / f"{method}.json", partial(run_method, method, seed, args.set, root, args.threads)
            )
            cand["seeds"].setdefault(str(seed), {})[method] = row
            print(f"{args.name} seed {seed} {method:<9} val {row['val_accuracy']:.2f}  test {row['test_accuracy']:.2f}  "
                  f"MMACs {row['macs'] / 1e6:.2f} (nominal {row['nominal_macs'] / 1e6:.2f})  {row['seconds']:.0f} s",
                  flush=True)  # fmt: skip
            write_results(out, {**data, "summary": summarise(data)})


if __name__ == "__main__":
    main()
