"""Lottery Jackpots on Fashion-MNIST resnet_small (issue 31): a mask searched over frozen trained
weights against the baselines that explain where its accuracy comes from.

Per seed (``train.seed``: the initialisation, the validation split, the batches), one network is
trained B = ``--base-epochs`` epochs with the recipe of ``configs/prune.yaml`` (``base``, also the
row ``dense``); every arm starts from it and gets the same F = ``--epochs`` epochs after pruning.
At each sparsity S in ``--sparsities`` (default 90 % and 95 % of the conv weights, one global
magnitude threshold, the classifier dense -- the layer-wise sparsity of the official code):

  magnitude_S      the global magnitude mask, nothing trained (the search's starting point)
  magnitude_bn_S   the same, BatchNorm statistics recalibrated on ``--recal-images`` training
                   images (seconds): Lottery Jackpots' statistics move during its search, and
                   this row keeps that gain from being credited to the mask
  lj_S             Lottery Jackpots: F epochs of mask search from the magnitude initialisation
                   (scores 1.0 / 0.99), weights and BN affine frozen
  lj_uniform_S     the same search, every score 1.0 and a random starting mask
  lj_random_S      the same search, edge-popup's Kaiming-uniform scores (mask: their top-k)
  magnitude_ft_S   the magnitude mask, the weights fine-tuned F epochs under it (lr
                   ``prune.finetune_lr``, cosine)
  dense            the base network

The search runs on the engine with the config's optimizer (SGD Nesterov lr 0.1, weight decay
``optim.weight_decay`` on the scores, cosine, no warm-up); every arm is the network at the end of
its schedule (no epoch picked on any split). The searches validate after every epoch
(``val_curve``: epoch 0 is the unsearched starting mask), which gives the search cost: the
epochs the magnitude initialisation needs to reach the final validation accuracy of the random
one (issue goal: <= 1/3 of them). Test accuracy is on the full 10k test split. Each row records
the non-zero parameters, the mask's overlap with the magnitude mask and the compressed sparse
file (bitmask + values) against dense float32. No latency: the result runs dense (no sparse
kernel here beats dense convolution at these sizes), so no speed-up is claimed.

Each run is a resumable run directory under ``--runs``/seedN/NAME with its row cached as
``NAME.json``, so a killed seed continues where it stopped. Cost on one core of the shared
development machine (1.5-3 min per full-network epoch): B + 4 F epochs per sparsity, about 1.5-2.5
hours per seed at B = 8, F = 5.

    python bench/bench_jackpot.py --seed 0                 # one seed -> bench/out/jackpot_seed0.json
    python bench/bench_jackpot.py --summary                # bench/out/jackpot_seed*.json -> bench/out/jackpot.json
    python bench/bench_jackpot.py --seed 0 --quick         # smoke run (minutes; says nothing)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import QUICK, fmt_mean_se, goal_table, mean_se, quick_path, set_threads, test_split, write_results
from torch import nn

from dynaslice import runs
from dynaslice.atomic import cached_json
from dynaslice.prune import PruneResult, jackpot_prune, model_accuracy, train_base
from dynaslice.prune.common import finish
from dynaslice.prune.run import full_network
from dynaslice.train import load_config
from dynaslice.train.bn import recal_batches
from dynaslice.train.data import eval_loader, load_split

INITS = {"lj": "magnitude", "lj_uniform": "uniform", "lj_random": "random"}

# paired comparisons of issue 31 at each sparsity: (name, than); the goals: lj within 1 point of
# dense, >= 2 points above magnitude_bn at 90 %
GOALS = [("lj", "dense"), ("lj", "magnitude_bn"), ("lj", "magnitude"), ("lj", "lj_uniform"), ("lj", "lj_random"),
         ("lj", "magnitude_ft"), ("magnitude_bn", "magnitude")]  # fmt: skip


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Every BatchNorm's running statistics recomputed as the plain average over ``batches`` (the
    rest of the network in eval mode); returns ``model`` in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
        bn.train()
    for x in batches:
        model(x)
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


def val_curve(run_dir: Path) -> list[tuple[float, float]]:
    """``(epoch, val top-1)`` of a training phase, from its metrics log."""
    curve = []
    for line in (run_dir / runs.METRICS).read_text().splitlines():
        record = json.loads(line)
        if "val" in record:
            curve.append((record["epoch"], record["val"]["accuracy"]))
    return sorted(dict(curve).items())


class Bench:
    """One seed's arms, each a run directory and a cached row under ``root``."""

    def __init__(self, args: argparse.Namespace, seed: int):
        self.args, self.seed = args, seed
        self.root = Path(args.runs) / f"seed{seed}"
        overrides = [
            *(QUICK if args.quick else []), f"train.seed={seed}", f"train.threads={args.threads}",
            f"train.epochs={args.base_epochs + args.epochs}", f"prune.finetune_epochs={args.epochs}",
            "train.eval_every_epochs=1", *args.set,
        ]  # fmt: skip
        self.cfg = load_config("prune", overrides)
        self.model, self.size, _ = full_network(self.cfg)
        self.val = eval_loader(load_split(self.cfg.data, "val", seed))
        self.test = eval_loader(test_split(self.cfg, args.test_images))
        self.recal = recal_batches(load_split(self.cfg.data, "train", seed), args.recal_images, 200, seed)
        self.base = train_base(self.model, self.cfg, self.root / runs.PRUNE_BASE, resume=True)
        self.rows: dict[str, dict[str, Any]] = {}

    def run(self, name: str, make: Callable[[Path], PruneResult]) -> dict[str, Any]:
        """``make(run_dir)`` -> PruneResult, evaluated on val and test; cached as ``NAME.json``."""

        def compute() -> dict[str, Any]:
            t0 = time.perf_counter()
            result = make(self.root / name)
            seconds = time.perf_counter() - t0
            row = {"name": name, **result.summary(), "seconds": seconds}
            row["val_accuracy"] = model_accuracy(result.model, self.val)  # the final network, whatever trained it
            row["test_accuracy"] = model_accuracy(result.model, self.test)
            if (self.root / name / runs.PRUNE_TRAIN / runs.METRICS).is_file():
                start = model_accuracy(jackpot_prune(self.base, self.size, row["info"]["sparsity"],
                                               init=row["info"]["init"], seed=self.seed).model, self.val)  # fmt: skip
                row["val_curve"] = [(0.0, start), *val_curve(self.root / name / runs.PRUNE_TRAIN)]
            return row

        row = self.rows[name] = cached_json(self.root / f"{name}.json", compute)
        print(
            f"seed {self.seed} {name:<18} val {row['val_accuracy']:.2f}  test {row['test_accuracy']:.2f}  "
            f"non-zero {row['nonzero_params']:,}/{row['params']:,}  overlap {row['info'].get('overlap', 1.0):.3f}  "
            f"{row['seconds']:.0f} s",
            flush=True,
        )
        return row

    def arms(self, s: float) -> None:
        base, size, cfg, f, seed = self.base, self.size, self.cfg, self.args.epochs, self.seed
        tag = f"{round(s * 100)}"
        self.run(f"magnitude_{tag}", lambda d: jackpot_prune(base, size, s, seed=seed, run_dir=d))

        def recalibrated(d: Path) -> PruneResult:
            r = jackpot_prune(base, size, s, seed=seed, run_dir=d)
            return finish("magnitude_bn", recalibrate_bn(r.model, self.recal), size, info=r.info)

        self.run(f"magnitude_bn_{tag}", recalibrated)
        for name, init in INITS.items():
            self.run(f"{name}_{tag}", lambda d, init=init: jackpot_prune(
                base, size, s, init=init, search_epochs=f, seed=seed, cfg=cfg, run_dir=d, resume=True))  # fmt: skip
        self.run(f"magnitude_ft_{tag}", lambda d: jackpot_prune(
            base, size, s, search_epochs=0, tune_epochs=f, seed=seed, cfg=cfg, run_dir=d, resume=True))  # fmt: skip

    def dense(self) -> None:
        val = json.loads((self.root / runs.PRUNE_BASE / runs.FINAL_EVAL).read_text())
        self.run("dense", lambda d: finish("dense", copy.deepcopy(self.base), self.size, val=val))


# --------------------------------------------------------------------------- summary over seeds


def epochs_to_reach(curve: list[list[float]], target: float) -> float | None:
    """The first validated epoch at which ``curve`` reaches ``target`` (None: never)."""
    return next((epoch for epoch, acc in curve if acc >= target), None)


def search_cost(rows: dict[str, dict], tag: str) -> dict[str, Any] | None:
    """Epochs of the magnitude-initialised search to reach the random one's final val accuracy."""
    lj, rnd = rows.get(f"lj_{tag}"), rows.get(f"lj_random_{tag}")
    if not lj or not rnd or "val_curve" not in lj or "val_curve" not in rnd:
        return None
    target = rnd["val_curve"][-1][1]
    reached = epochs_to_reach(lj["val_curve"], target)
    total = rnd["val_curve"][-1][0]
    return {"target_val": target, "magnitude_epochs": reached, "random_epochs": total,
            "share": None if reached is None else reached / total}  # fmt: skip


def summarise(per_seed: dict[int, dict[str, dict]], sparsities: list[str]) -> dict[str, Any]:
    """Per arm: mean +- SE over seeds; per comparison: paired differences; the search cost."""
    names = list(dict.fromkeys(n for rows in per_seed.values() for n in rows))
    arms = {}
    for name in names:
        rows = [rows[name] for rows in per_seed.values() if name in rows]
        arms[name] = {
            k: mean_se([r[k] for r in rows]) for k in ("val_accuracy", "test_accuracy", "nonzero_params")
        }
        if all("overlap" in r["info"] for r in rows):
            arms[name]["overlap"] = mean_se([r["info"]["overlap"] for r in rows])
        if all("sparse_file" in r["info"] for r in rows):
            arms[name]["sparse_bytes"] = mean_se([r["info"]["sparse_file"]["bytes"] for r in rows])
            arms[name]["dense_float32_bytes"] = mean_se(
                [r["info"]["sparse_file"]["dense_float32_bytes"] for r in rows]
            )
    goals, costs = {}, {}
    for tag in sparsities:
        for a, b in GOALS:
            a_name, b_name = f"{a}_{tag}", b if b == "dense" else f"{b}_{tag}"
            seeds = [s for s, rows in per_seed.items() if a_name in rows and b_name in rows]
            if seeds:
                goals[f"{a_name} - {b_name}"] = {
                    "seeds": seeds,
                    **{split: mean_se([per_seed[s][a_name][f"{split}_accuracy"] - per_seed[s][b_name][f"{split}_accuracy"]
                                       for s in seeds]) for split in ("val", "test")},
                }  # fmt: skip
        costs[tag] = {s: search_cost(rows, tag) for s, rows in per_seed.items()}
    return {
        "arms": arms,
        "goals": goals,
        "search_cost": costs,
        "table": table(arms),
        "goal_table": goal_table(goals),
    }




def table(arms: dict[str, dict]) -> str:
    lines = [
        "| arm | non-zero params (k) | overlap with magnitude | sparse file (kB) | dense float32 (kB) | val top-1 (%) | test top-1 (%) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for name, r in arms.items():
        lines.append(
            f"| {name} | {fmt_mean_se(r.get('nonzero_params'), 1e-3, 1)} | {fmt_mean_se(r.get('overlap'), 1, 3)} | "
            f"{fmt_mean_se(r.get('sparse_bytes'), 1e-3, 0)} | {fmt_mean_se(r.get('dense_float32_bytes'), 1e-3, 0)} | "
            f"{fmt_mean_se(r.get('val_accuracy'))} | {fmt_mean_se(r.get('test_accuracy'))} |"
        )
    return "\n".join(lines)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None, help="run one seed -> OUT_DIR/jackpot_seedN.json")
    ap.add_argument(
        "--summary", action="store_true", help="OUT_DIR/jackpot_seed*.json -> OUT_DIR/jackpot.json"
    )
    ap.add_argument(
        "--base-epochs", type=int, default=8, help="epochs of the trained network every arm starts from (B)"
    )
    ap.add_argument(
        "--epochs", type=int, default=5, help="epochs of every arm after pruning: search or fine-tuning (F)"
    )
    ap.add_argument(
        "--sparsities", type=float, nargs="+", default=[0.9, 0.95], help="shares of the conv weights pruned"
    )
    ap.add_argument(
        "--recal-images", type=int, default=10000, help="training images of magnitude_bn's recalibration"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: bench/common.py's QUICK sizing (says nothing)"
    )
    ap.add_argument("--test-images", type=int, default=0, help="evaluate on the first N test images (0: all)")
    ap.add_argument("--runs", default="runs/bench_jackpot", help="run directories (resumable)")
    ap.add_argument("--out-dir", default="bench/out")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if (args.seed is None) == (not args.summary):
        ap.error("give --seed N (run one seed) or --summary (combine the seeds' files)")
    if args.base_epochs < 1 or args.epochs < 1 or args.recal_images < 1:
        ap.error("--base-epochs, --epochs and --recal-images must be >= 1")
    if not all(0 < s < 1 for s in args.sparsities):
        ap.error("--sparsities must lie in (0, 1)")
    set_threads(args.threads)
    out_dir = Path(args.out_dir)
    name = "jackpot_seed{}.json"
    if args.quick:
        args.runs += "_quick"
        args.test_images = args.test_images or 500
        name = quick_path(name)
    tags = [f"{round(s * 100)}" for s in args.sparsities]
    if args.summary:
        files = sorted(out_dir.glob(name.format("*")))
        if not files:
            ap.error(f"no {name.format('*')} in {out_dir}: run --seed N first")
        per_seed = {json.loads(f.read_text())["seed"]: json.loads(f.read_text())["rows"] for f in files}
        summary = summarise(per_seed, tags)
        write_results(out_dir / quick_path("jackpot.json") if args.quick else out_dir / "jackpot.json",
                      {"files": [str(f) for f in files], **summary})  # fmt: skip
        print(summary["table"] + "\n\n" + summary["goal_table"])
        print(json.dumps(summary["search_cost"], indent=1))
        return
    bench = Bench(args, args.seed)
    bench.dense()
    for s in args.sparsities:
        bench.arms(s)
    write_results(
        out_dir / name.format(args.seed), {"args": vars(args), "seed": args.seed, "rows": bench.rows}
    )


if __name__ == "__main__":
    main()
