"""FFSD on Fashion-MNIST resnet_small (issue 31): the student leader against the same network
trained alone, alone with FFSD's compute, DML, and offline KD from a trained larger teacher.

Per seed (``train.seed``: the initialisations, the validation split, the batches), every arm is
trained on the one engine with ``configs/ffsd.yaml`` (SGD 0.1 Nesterov, weight decay 1e-4, cosine,
batch 128, plain cross-entropy, T = 2) by :func:`dynaslice.train.train_online`, the same code:

  alone        the network alone, E = ``--epochs`` epochs (DML's code with one student)
  alone_long   the same for round(``--compute`` x E) epochs: about FFSD's compute (3 backbones,
               the fusion module and the decoders: ~3.5 networks per step)
  dml          DML, 2 students, T = 2, E epochs; the kept network is student 0
  teacher      the larger network ``--teacher-model`` (``--teacher-kwargs``) alone, E epochs
  kd           the network alone, E epochs, plus T^2 KL to the frozen teacher (offline KD)
  ffsd         FFSD, 2 common students + the leader, E epochs; the kept network is the leader

Every arm is the network at the end of its schedule (no epoch is picked on any split; every
setting was fixed before the runs), its validation accuracy from the run's held-out split, its
test accuracy on the full 10k test split from the saved plain model (``RUN/model.pt``). The
summary pairs the arms by seed (issue goals: ffsd - alone >= +0.5 points and ffsd - dml >= 0,
3 seeds). Each arm is a resumable run directory under ``--runs``/seedN/NAME with its row cached
as ``NAME.json``, so a killed seed continues where it stopped.

    python bench/bench_ffsd.py --seed 0                  # one seed -> bench/out/ffsd_seed0.json
    python bench/bench_ffsd.py --summary                 # bench/out/ffsd_seed*.json -> bench/out/ffsd.json
    python bench/bench_ffsd.py --seed 0 --quick          # smoke run (minutes; says nothing)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from common import QUICK, fmt_mean_se, goal_table, mean_se, quick_path, set_threads, test_split, write_results
from torch import nn

from dynaslice import runs
from dynaslice.atomic import cached_json
from dynaslice.prune import model_accuracy
from dynaslice.train import load_config, train_online
from dynaslice.train.data import eval_loader

# the paired comparisons: (arm, than); the goals are the first two
GOALS = [("ffsd", "alone"), ("ffsd", "dml"), ("ffsd", "alone_long"), ("ffsd", "kd"), ("dml", "alone"),
         ("kd", "alone"), ("alone_long", "alone")]  # fmt: skip


def val_curve(run_dir: Path) -> list[tuple[float, float]]:
    """``(epoch, val top-1 of the kept network)`` from a run's metrics log."""
    curve = {}
    for line in (run_dir / runs.METRICS).read_text().splitlines():
        record = json.loads(line)
        if "val" in record:
            curve[record["epoch"]] = record["val"]["accuracy"]
    return sorted(curve.items())


def load_plain(run_dir: Path) -> nn.Module:
    """The kept network a run saved (the benchmark's own file: a pickle it wrote itself)."""
    return torch.load(run_dir / runs.PRUNED_MODEL, weights_only=False).eval()


class Bench:
    """One seed's arms, each a run directory and a cached row under ``root``."""

    def __init__(self, args: argparse.Namespace, seed: int):
        self.args, self.seed = args, seed
        self.root = Path(args.runs) / f"seed{seed}"
        self.base = [*(QUICK if args.quick else []), f"train.seed={seed}", f"train.threads={args.threads}",
                     "train.eval_every_epochs=1", *args.set]  # fmt: skip
        self.test = eval_loader(test_split(load_config(args.config, self.base), args.test_images))
        self.rows: dict[str, dict[str, Any]] = {}

    def config(self, target: str, students: int, epochs: int, *extra: str):
        return load_config(self.args.config, [*self.base, f"train.target={target}",
                                              f"train.ffsd.students={students}", f"train.epochs={epochs}", *extra])  # fmt: skip

    def run(self, name: str, cfg, teacher: Callable[[], nn.Module] | None = None) -> dict[str, Any]:
        """Train (or resume) arm ``name``; its row is cached as ``NAME.json``."""

        def compute() -> dict[str, Any]:
            t0 = time.perf_counter()
            result = train_online(cfg, self.root / name, resume=True, teacher=teacher() if teacher else None)
            seconds = time.perf_counter() - t0
            row = {"name": name, "epochs": cfg.train.epochs, "model": cfg.model.name, **result, "seconds": seconds}
            row["val_accuracy"] = result["accuracy"]
            row["test_accuracy"] = model_accuracy(load_plain(self.root / name), self.test)
            row["val_curve"] = val_curve(self.root / name)
            return row

        row = self.rows[name] = cached_json(self.root / f"{name}.json", compute)
        print(f"seed {self.seed} {name:<11} val {row['val_accuracy']:.2f}  test {row['test_accuracy']:.2f}  "
              f"{row['macs'] / 1e6:.1f} MMACs  {row['params'] / 1e3:.0f}k params  {row['seconds']:.0f} s", flush=True)  # fmt: skip
        return row

    def arms(self) -> None:
        e, a = self.args.epochs, self.args
        self.run("alone", self.config("dml", 1, e))
        self.run("alone_long", self.config("dml", 1, round(a.compute * e)))
        self.run("dml", self.config("dml", 2, e))
        teacher_model = [f"model.name={a.teacher_model}", f"model.kwargs={a.teacher_kwargs}"]
        self.run("teacher", self.config("dml", 1, e, *teacher_model))
        self.run("kd", self.config("dml", 1, e), teacher=lambda: load_plain(self.root / "teacher"))
        self.run("ffsd", self.config("ffsd", a.students, e))


# --------------------------------------------------------------------------- summary over seeds


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict[str, Any]:
    """Per arm: mean +- SE over seeds; per comparison: paired differences (val and test)."""
    names = list(dict.fromkeys(n for rows in per_seed.values() for n in rows))
    arms = {}
    for name in names:
        rows = [rows[name] for rows in per_seed.values() if name in rows]
        arms[name] = {k: mean_se([r[k] for r in rows]) for k in ("val_accuracy", "test_accuracy", "seconds")}
        arms[name].update(epochs=rows[0]["epochs"], model=rows[0]["model"], macs=rows[0]["macs"], params=rows[0]["params"])
    goals = {}
    for a, b in GOALS:
        seeds = [s for s, rows in per_seed.items() if a in rows and b in rows]
        if seeds:
            goals[f"{a} - {b}"] = {
                "seeds": seeds,
                **{split: mean_se([per_seed[s][a][f"{split}_accuracy"] - per_seed[s][b][f"{split}_accuracy"]
                                   for s in seeds]) for split in ("val", "test")},
            }  # fmt: skip
    return {"arms": arms, "goals": goals, "table": table(arms), "goal_table": goal_table(goals)}




def table(arms: dict[str, dict]) -> str:
    lines = ["| arm | network | epochs | MMACs | params (k) | val top-1 (%) | test top-1 (%) | minutes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, r in arms.items():
        minutes = {**r["seconds"], "mean": r["seconds"]["mean"] / 60, "se": (r["seconds"]["se"] or 0) / 60}
        lines.append(f"| {name} | {r['model']} | {r['epochs']} | {r['macs'] / 1e6:.1f} | {r['params'] / 1e3:.0f} | "
                     f"{fmt_mean_se(r['val_accuracy'])} | {fmt_mean_se(r['test_accuracy'])} | {fmt_mean_se(minutes, digits=1)} |")  # fmt: skip
    return "\n".join(lines)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None, help="run one seed -> OUT_DIR/ffsd_seedN.json")
    ap.add_argument("--summary", action="store_true", help="OUT_DIR/ffsd_seed*.json -> OUT_DIR/ffsd.json")
    ap.add_argument("--config", default="configs/ffsd.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="E: the epochs of every arm but alone_long (10; --quick 1)")
    ap.add_argument("--compute", type=float, default=3.5, help="alone_long trains round(COMPUTE x E) epochs")
    ap.add_argument("--students", type=int, default=2, help="FFSD's common students (m)")
    ap.add_argument("--teacher-model", default="resnet18", help="the offline teacher's model.name")
    ap.add_argument("--teacher-kwargs", default="{small_input: true}", help="its model.kwargs (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smoke run: bench/common.py's QUICK sizing (says nothing)")
    ap.add_argument("--test-images", type=int, default=0, help="evaluate on the first N test images (0: all)")
    ap.add_argument("--runs", default="runs/bench_ffsd", help="run directories (resumable)")
    ap.add_argument("--out-dir", default="bench/out")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.epochs = args.epochs or (1 if args.quick else 10)
    if (args.seed is None) == (not args.summary):
        ap.error("give --seed N (run one seed) or --summary (combine the seeds' files)")
    if args.epochs < 1 or args.compute < 1 or args.students < 1:
        ap.error("--epochs and --students must be >= 1, --compute >= 1")
    if not isinstance(yaml.safe_load(args.teacher_kwargs), dict):
        ap.error("--teacher-kwargs must be a YAML mapping, e.g. '{small_input: true}'")
    set_threads(args.threads)
    out_dir = Path(args.out_dir)
    name = "ffsd_seed{}.json"
    if args.quick:
        args.runs += "_quick"
        args.test_images = args.test_images or 500
        name = quick_path(name)
    if args.summary:
        files = sorted(out_dir.glob(name.format("*")))
        if not files:
            ap.error(f"no {name.format('*')} in {out_dir}: run --seed N first")
        per_seed = {json.loads(f.read_text())["seed"]: json.loads(f.read_text())["rows"] for f in files}
        summary = summarise(per_seed)
        write_results(out_dir / quick_path("ffsd.json") if args.quick else out_dir / "ffsd.json",
                      {"files": [str(f) for f in files], **summary})  # fmt: skip
        print(summary["table"] + "\n\n" + summary["goal_table"])
        return
    bench = Bench(args, args.seed)
    bench.arms()
    write_results(out_dir / name.format(args.seed), {"args": vars(args), "seed": args.seed, "rows": bench.rows})


if __name__ == "__main__":
    main()
