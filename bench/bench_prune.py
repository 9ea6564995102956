"""Pruning on Fashion-MNIST resnet_small: DCFF, White-Box, 1xN and the baselines they are judged by.

Every network trains on the project's engine with the recipe of ``configs/prune.yaml`` (SGD
Nesterov lr 0.1, cosine, 0.1 epoch warm-up; label smoothing 0.1) for E = ``--epochs`` epochs in
all; prune-then-fine-tune pipelines spend F = ``--ft-epochs`` of them fine-tuning at ``--ft-lr`` 0.01
(the preset's own fine-tuning, longer and at a higher lr, is bench/prune_preset.py's). Per
seed (``train.seed``: the initialisation, the validation split, the batches):

  base  the full network trained E - F epochs; every prune-then-fine-tune method starts from it
        (reported as the row ``base``)
  (a)   ~--target of the full MACs, DCFF's uniform keep ratio over every conv (residual streams
        included): DCFF from scratch, E epochs, the official temperature schedule (``dcff``) and
        the official 300-epoch CIFAR schedule compressed into E epochs (``dcff_scaled``: k and
        updates per epoch = 300 / E) | L1 filters at those widths + F | those widths from
        scratch, E epochs
  (b)   the same MACs target: White-Box (masks and network E - F epochs, global vote, F
        fine-tuning) | L1 on block-internal widths, uniform ratio, + F | random channels with
        White-Box's per-layer widths + F | White-Box's architecture from scratch, E epochs
  (c)   --sparsity of the weights of every conv but the stem: 1xN (N = 4, 8, with and without
        filter rearrangement) + F | unstructured magnitude + F | L1 filter pruning at the
        parameters of 1x4 (every group) + F
  (d)   (``--supernet RUN``) the supernet's widest uniform subnet within the (a)/(b) target (BN
        recalibrated on 2000 training images) | that architecture trained alone for E epochs

Data: the full Fashion-MNIST training split minus a 5000-image validation split; nothing is
selected on the 10k test split (every network is the one at the end of its schedule; the DCFF
schedule question is read on the validation column). Each run is a resumable run directory
under ``--runs``/seedN/NAME, exported to ``NAME.onnx`` (dense weights); its row (costs from
``FlopCounterMode``, val and test top-1) is cached as ``NAME.json``, so a killed seed continues
where it stopped. 1xN and magnitude rows report ``macs`` (dense, what runs) next to
``nominal_macs`` (non-zero weights only): no 1xN kernel exists in torch or onnxruntime.
``--latency`` adds each network's onnxruntime latency at batch 1 (interleaved rounds; quiet
machine only).

Budget: E = 1, F = 0.25 (429 steps of 128 images per epoch). On one core of the shared
development machine a full-width step costs 1.1-1.6 s (half the MACs: ~1.3 s), so one seed is
about 9 full-network epochs of training (base 0.75, DCFF 2 x ~0.9, White-Box 0.8, two scratch
nets ~1.7, four 1xN + magnitude fine-tunes 1.25 at full width, four channel-pruned fine-tunes
~0.9) plus evaluating 16 networks on 15k images: ~75-100 min. Short budgets are where the methods
differ most (inherited weights versus training from scratch, a criterion versus the widths it
picks); one epoch leaves the full network short of saturation.

    python bench/bench_prune.py --seed 0                 # one seed -> bench/out/prune_seed0.json
    python bench/bench_prune.py --summary                # bench/out/prune_seed*.json -> bench/out/prune.json
    python bench/bench_prune.py --seed 0 --quick         # smoke run (minutes; says nothing)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import QUICK, fmt_mean_se, goal_table, mean_se, set_threads, test_split, write_results

import dynaslice as ds
from dynaslice import runs
from dynaslice.atomic import cached_json
from dynaslice.counting import count_module_macs
from dynaslice.prune import (
    PruneResult,
    dcff_train,
    export_pruned_onnx,
    magnitude_prune,
    model_accuracy,
    onexn_prune,
    prune_l1,
    prune_random,
    train_base,
    train_from_scratch,
    whitebox_prune,
)
from dynaslice.prune.common import finish, reinitialize
from dynaslice.prune.phases import run_phase
from dynaslice.prune.run import full_network
from dynaslice.train import load_config
from dynaslice.train.data import eval_loader, load_split

SCALED_FROM = 300  # the official CIFAR schedule's epochs, compressed into the run for dcff_scaled

# paired comparisons of issue 19 (a)-(c): (name, better?, than)
GOALS = {
    "a": [("dcff", "l1_all"), ("dcff", "scratch_all"), ("dcff_scaled", "l1_all"), ("dcff_scaled", "scratch_all")],
    "b": [("whitebox", "l1_internal"), ("whitebox", "random_wb"), ("whitebox", "scratch_wb")],
    "c": [("1x4_rearranged", "1x4"), ("1x8_rearranged", "1x8"), ("1x4", "l1_params"), ("1x4", "magnitude"),
          ("1x4_rearranged", "l1_params"), ("1x8_rearranged", "l1_params"), ("1x4_rearranged", "magnitude")],
    "d": [("supernet", "alone"), ("dcff", "supernet"), ("whitebox", "supernet")],
}  # fmt: skip


class Bench:
    """One seed's runs, each a run directory and a cached row under ``root``."""

    def __init__(self, args: argparse.Namespace, seed: int):
        self.args, self.seed = args, seed
        self.root = Path(args.runs) / f"seed{seed}"
        overrides = [
            f"train.seed={seed}", f"train.threads={args.threads}", f"train.epochs={args.epochs}",
            f"prune.finetune_epochs={args.ft_epochs}", f"prune.finetune_lr={args.ft_lr}",
            *(QUICK if args.quick else []), *args.set,
        ]  # fmt: skip
        self.cfg = load_config("prune", overrides)
        self.model, self.size, self.classes = full_network(self.cfg)
        self.val = eval_loader(load_split(self.cfg.data, "val", seed))
        self.test = eval_loader(test_split(self.cfg, args.test_images))
        self.full_macs = count_module_macs(self.model, self.size)
        self.target = int(args.target * self.full_macs)
        self._base: torch.nn.Module | None = None
        self.rows: dict[str, dict[str, Any]] = {}

    def base(self) -> torch.nn.Module:
        """The full network after E - F epochs (``RUN/base``), also reported as the row ``base``."""
        if self._base is None:
            base = self._base = train_base(self.model, self.cfg, self.root / "base", resume=True)
            val = json.loads((self.root / "base" / runs.FINAL_EVAL).read_text())
            self.run("base", lambda d: finish("base", copy.deepcopy(base), self.size, val=val))
        return self._base

    def run(self, name: str, make) -> dict[str, Any]:
        """``make(run_dir)`` -> PruneResult, exported and evaluated; cached as ``NAME.json``."""

        def compute() -> dict[str, Any]:
            t0 = time.perf_counter()
            result: PruneResult = make(self.root / name)
            seconds = time.perf_counter() - t0
            export_pruned_onnx(result, self.root / f"{name}.onnx")
            row = {"name": name, **result.summary(), "train_seconds": seconds}
            row["info"] = {k: v for k, v in row["info"].items() if k != "scores"}  # in the run directory
            if row["val_accuracy"] is None:
                row["val_accuracy"] = model_accuracy(result.model, self.val)
            row["test_accuracy"] = model_accuracy(result.model, self.test)
            return row

        row = self.rows[name] = cached_json(self.root / f"{name}.json", compute)
        print(
            f"seed {self.seed} {name:<15} val {row['val_accuracy']:.2f}  test {row['test_accuracy']:.2f}  "
            f"MMACs {row['macs'] / 1e6:.2f} (nominal {row['nominal_macs'] / 1e6:.2f})  "
            f"params {row['nonzero_params']:,}/{row['params']:,}  {row['train_seconds']:.0f} s",
            flush=True,
        )
        return row

    # ----------------------------------------------------------------------- the comparisons

    def part_a(self) -> None:
        self.base()
        m, size, cfg, p = self.model, self.size, self.cfg, self.cfg.prune
        schedule = {"t_start": p.t_start, "t_end": p.t_end}
        dcff = self.run("dcff", lambda d: dcff_train(m, size, cfg, d, target_macs=self.target, include="all",
                                                     k=1.0, updates_per_epoch=1,  # official, not the preset's
                                                     resume=True, **schedule))  # fmt: skip
        scaled = SCALED_FROM / self.args.epochs
        self.run("dcff_scaled", lambda d: dcff_train(m, size, cfg, d, target_macs=self.target, include="all",
                                                     k=scaled, updates_per_epoch=round(scaled),
                                                     resume=True, **schedule))  # fmt: skip
        widths = dcff["widths"]
        self.run("l1_all", lambda d: prune_l1(self.base(), size, widths=widths, cfg=cfg, run_dir=d, resume=True))
        self.run("scratch_all", lambda d: train_from_scratch(m, size, widths=widths, seed=self.seed, cfg=cfg,
                                                             run_dir=d, resume=True))  # fmt: skip

    def part_b(self) -> None:
        self.base()
        m, size, cfg, p = self.model, self.size, self.cfg, self.cfg.prune
        wb = self.run("whitebox", lambda d: whitebox_prune(m, size, self.classes, self.target, cfg, d, lam=p.lam,
                                                           min_keep=p.min_keep, resume=True))  # fmt: skip
        widths = wb["widths"]
        self.run("l1_internal", lambda d: prune_l1(self.base(), size, target_macs=self.target, include="internal",
                                                   cfg=cfg, run_dir=d, resume=True))  # fmt: skip
        self.run("random_wb", lambda d: prune_random(self.base(), size, widths=widths, seed=self.seed, cfg=cfg,
                                                     run_dir=d, resume=True))  # fmt: skip
        self.run("scratch_wb", lambda d: train_from_scratch(m, size, widths=widths, seed=self.seed, cfg=cfg,
                                                            run_dir=d, resume=True))  # fmt: skip

    def part_c(self) -> None:
        self.base()
        size, cfg, s = self.size, self.cfg, self.args.sparsity
        for n in (4, 8):
            for rearrange in (True, False):
                name = f"1x{n}{'_rearranged' if rearrange else ''}"
                self.run(name, lambda d, n=n, r=rearrange: onexn_prune(
                    self.base(), size, n, s, r, cfg=cfg, run_dir=d, resume=True))  # fmt: skip
        self.run("magnitude", lambda d: magnitude_prune(self.base(), size, s, cfg=cfg, run_dir=d, resume=True))
        params = self.rows["1x4_rearranged"]["nonzero_params"]
        self.run("l1_params", lambda d: prune_l1(self.base(), size, target_params=params, include="all", cfg=cfg,
                                                 run_dir=d, resume=True))  # fmt: skip

    def part_d(self) -> None:
        from dynaslice.modelfile import load_supernet, resolve_model_file
        from dynaslice.train import recalibrate_bn

        net, _ = load_supernet(resolve_model_file(self.args.supernet))
        if tuple(net.input_size) != self.size:
            raise SystemExit(f"--supernet takes inputs {tuple(net.input_size)}, this benchmark {self.size}")
        fits = [a for a in (net.space.uniform(r / 100) for r in range(35, 101, 5))
                if ds.count_macs(net, a, self.size) <= self.target]  # fmt: skip
        if not fits:
            raise SystemExit(f"no uniform subnet of {self.args.supernet} fits {self.target:,} MACs")
        arch = max(fits, key=lambda a: ds.count_macs(net, a, self.size))
        info = {"arch": arch.to_dict(), "supernet": str(self.args.supernet)}

        def supernet_row(run_dir: Path) -> PruneResult:
            train_ds = load_split(self.cfg.data, "train", self.seed)
            recalibrate_bn(net, [arch], train_ds, num_images=2000, seed=self.seed)
            return finish("supernet", ds.extract_subnet(net, arch, self.size), self.size, info=info)

        def alone(run_dir: Path) -> PruneResult:
            model = reinitialize(ds.extract_subnet(net, arch, self.size), seed=self.seed)
            val = run_phase(model, self.cfg, run_dir, runs.PRUNE_TRAIN, resume=True)
            return finish("alone", model, self.size, val=val, info=info)

        self.run("supernet", supernet_row)
        self.run("alone", alone)


def latency_rows(root: Path, repeats: int) -> dict[str, float]:
    """Median onnxruntime latency (ms, batch 1, one thread) of every exported network of a seed,
    each in a session as dynaslice makes them (:func:`dynaslice.onnx_package.open_session`)."""
    import numpy as np

    from dynaslice.latency import measure_latency
    from dynaslice.onnx_package import open_session

    sessions = {p.stem: open_session(p, threads=1) for p in sorted(root.glob("*.onnx"))}
    x = {k: np.zeros([1, *s.get_inputs()[0].shape[1:]], dtype=np.float32) for k, s in sessions.items()}
    fns = {k: (lambda s=s, k=k: s.run(None, {s.get_inputs()[0].name: x[k]})) for k, s in sessions.items()}
    times = measure_latency(fns, repeats=repeats)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- summary over seeds


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict[str, Any]:
    """Per run: mean +- SE over seeds of accuracies and costs; per goal: the paired differences."""
    names = list(dict.fromkeys(n for rows in per_seed.values() for n in rows))
    runs = {}
    for name in names:
        rows = [rows[name] for rows in per_seed.values() if name in rows]
        keys = ("val_accuracy", "test_accuracy", "macs", "nominal_macs", "params", "nonzero_params", "latency_ms")
        runs[name] = {k: mean_se([r[k] for r in rows]) for k in keys if all(r.get(k) is not None for r in rows)}
        # a seed's networks are timed interleaved in one process: its ratios are paired, its
        # absolute times drift from process to process
        pairs = [(r["base"].get("latency_ms"), r[name].get("latency_ms")) for r in per_seed.values() if name in r and "base" in r]
        if pairs and all(a and b for a, b in pairs):
            runs[name]["speedup"] = mean_se([a / b for a, b in pairs])
    goals = {}
    for part, pairs in GOALS.items():
        for a, b in pairs:
            seeds = [s for s, rows in per_seed.items() if a in rows and b in rows]
            if seeds:
                goals[f"{a} - {b}"] = {
                    "part": part, "seeds": seeds,
                    **{split: mean_se([per_seed[s][a][f"{split}_accuracy"] - per_seed[s][b][f"{split}_accuracy"]
                                       for s in seeds]) for split in ("val", "test")},
                }  # fmt: skip
    return {"runs": runs, "goals": goals, "table": table(runs), "goal_table": goal_table(goals)}




def table(runs: dict[str, dict]) -> str:
    lines = [
        "| run | MMACs (dense) | MMACs (nominal) | params (k) | non-zero params (k) | val top-1 (%) | test top-1 (%) | latency (ms) | speed-up vs base |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for name, r in runs.items():
        lines.append(
            f"| {name} | {fmt_mean_se(r.get('macs'), 1e-6)} | {fmt_mean_se(r.get('nominal_macs'), 1e-6)} | "
            f"{fmt_mean_se(r.get('params'), 1e-3, 1)} | {fmt_mean_se(r.get('nonzero_params'), 1e-3, 1)} | "
            f"{fmt_mean_se(r.get('val_accuracy'))} | {fmt_mean_se(r.get('test_accuracy'))} | {fmt_mean_se(r.get('latency_ms'), 1, 3)} | "
            f"{fmt_mean_se(r.get('speedup'))} |"
        )
    return "\n".join(lines)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None, help="run one seed -> OUT_DIR/prune_seedN.json")
    ap.add_argument("--summary", action="store_true", help="summarise OUT_DIR/prune_seed*.json -> OUT_DIR/prune.json")
    ap.add_argument("--epochs", type=int, default=1, help="training budget of every pipeline (E)")
    ap.add_argument("--ft-epochs", type=float, default=0.25, help="fine-tuning epochs after pruning (F)")
    # the recorded comparison's fine-tuning lr; configs/prune.yaml's preset moved on (issue 33)
    ap.add_argument("--ft-lr", type=float, default=0.01, help="fine-tuning learning rate (bench/out/prune.json: 0.01)")
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c", "d"])
    ap.add_argument("--target", type=float, default=0.5, help="MACs target of (a), (b), (d) as a fraction")
    ap.add_argument("--sparsity", type=float, default=0.5, help="weight sparsity of (c)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smoke run: bench/common.py's QUICK sizing")
    ap.add_argument("--test-images", type=int, default=0, help="evaluate on the first N test images (0: all)")
    ap.add_argument("--supernet", default=None, metavar="RUN", help="supernet run or model file for part (d)")
    ap.add_argument("--latency", action="store_true", help="measure onnxruntime latency (quiet machine only)")
    ap.add_argument("--latency-repeats", type=int, default=50)
    ap.add_argument("--runs", default="runs/bench_prune", help="run directories (resumable)")
    ap.add_argument("--out-dir", default="bench/out")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if (args.seed is None) == (not args.summary):
        ap.error("give --seed N (run one seed) or --summary (combine the seeds' files)")
    if "d" in args.parts and not args.supernet:
        ap.error("part d needs --supernet RUN")
    set_threads(args.threads)
    out_dir = Path(args.out_dir)
    if args.summary:
        files = sorted(out_dir.glob("prune_seed*.json"))
        per_seed = {json.loads(f.read_text())["seed"]: json.loads(f.read_text())["rows"] for f in files}
        summary = summarise(per_seed)
        write_results(out_dir / "prune.json", {"files": [str(f) for f in files], **summary})
        print(summary["table"] + "\n\n" + summary["goal_table"])
        return
    bench = Bench(args, args.seed)
    for part in args.parts:
        getattr(bench, f"part_{part}")()
    if args.latency:
        for name, ms in latency_rows(bench.root, args.latency_repeats).items():
            bench.rows[name]["latency_ms"] = ms
    write_results(out_dir / f"prune_seed{args.seed}.json", {"args": vars(args), "seed": args.seed, "rows": bench.rows})


if __name__ == "__main__":
    main()
