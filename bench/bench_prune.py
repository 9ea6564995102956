"""Pruning on Fashion-MNIST resnet_small: DCFF, White-Box, 1xN and the baselines they are judged by.

Per seed, with E = --epochs (the budget of every pipeline) and F = --ft-epochs (fine-tuning):

  base  the full network trained E - F epochs; every prune-then-fine-tune method starts from it
  (a)   ~--target of the full MACs: DCFF trained from scratch for E epochs | L1 filters (same
        widths: DCFF's uniform ratio over every conv, residual streams included) + F epochs of
        fine-tuning | that compact network from scratch for E epochs
  (b)   the same MACs target: White-Box (masks and network trained E - F epochs, global vote,
        F fine-tuning) | L1 on block-internal widths, uniform ratio + F | random channels with
        White-Box's per-layer widths + F | White-Box's architecture from scratch for E epochs
  (c)   --sparsity of the weights of every conv but the stem: 1xN (N = 4, 8, with and without
        filter rearrangement) + F | unstructured magnitude + F | L1 filter pruning at the same
        number of parameters as 1x4 + F
  (d)   (with --supernet CKPT) the supernet's widest uniform subnet within the (a)/(b) target
        (BN recalibrated on 2000 training images) | that architecture trained alone for E epochs

So every pipeline trains for E epochs in all, on the full Fashion-MNIST training split minus a
5000-image validation split (--train-size for smoke runs). Nothing is selected on the test split:
each network is the one at the end of its schedule, reported on val (5k) and test (10k). Every
final network is exported to ONNX (``runs/.../seed*/NAME.onnx``, dense weights); ``--latency``
adds its measured onnxruntime latency at batch 1 (interleaved rounds; run it on a quiet machine).
1xN and magnitude rows report ``macs`` (dense, what runs) next to ``nominal_macs`` (non-zero
weights only): no 1xN kernel exists in torch or onnxruntime, so their latency is the dense one.

Budget: E = 2, F = 0.5 by default. A full-width training step of 128 images costs about 1.1 s on
one core (bench/out/stage1_cost.json: 1.08 s), so one epoch of 55k images costs ~7.7 min at full
width and ~4 min at half the MACs. One seed of (a)-(c) is about 10 full-width-epoch equivalents
(base and White-Box masks 1.5 each, DCFF ~1.2, the two scratch nets ~2, the five sparse
fine-tunes 2.5 -- they run dense --, five channel-pruned fine-tunes ~1.3) = ~77 min, plus ~8 min
to evaluate (15k images per network) and export the 15 networks: ~85 min. Short budgets are where
the methods differ most (inherited weights versus training from scratch, a criterion versus the
widths it picks), and E = 2 leaves the full network short of saturation (the Stage-I static
network reaches 85.9% after 2 epochs of 16k images), so the comparisons are not all ties.
(d) adds E epochs of a ~50% network (~8 min).

    python bench/bench_prune.py --seeds 0 1 2                       # the benchmark (~85 min/seed)
    python bench/bench_prune.py --epochs 1 --ft-epochs 0.5 --train-size 2000 --test-images 1000
        --parts a b c --out bench/out/prune_smoke.json                # smoke run (minutes)
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

import dynaslice as ds
from dynaslice.atomic import atomic_path, atomic_write_json, cached_json
from dynaslice.prune import (
    FitConfig,
    PruneResult,
    accuracy,
    count_model_macs,
    dcff_train,
    export_onnx,
    magnitude_prune,
    onexn_prune,
    prune_l1,
    prune_random,
    train_from_scratch,
    whitebox_prune,
)
from dynaslice.prune._fit import fit
from dynaslice.prune.common import finish, reinitialize
from dynaslice.train.config import DataConfig
from dynaslice.train.data import eval_loader, load_split, train_loader
from dynaslice.train.samplers import derive_seed

SIZE = (1, 28, 28)


def fresh_model(seed: int) -> torch.fx.GraphModule:
    """An untrained plain resnet_small (the supernet's largest subnet), the same for a given seed."""
    torch.manual_seed(derive_seed("bench-prune-init", seed))
    net = ds.create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=SIZE[1])
    return ds.extract_subnet(net, net.space.largest())


class Bench:
    """One seed's runs, each cached as JSON (and its network as ONNX) under ``root``."""

    def __init__(self, args: argparse.Namespace, seed: int):
        self.args, self.seed = args, seed
        self.root = Path(args.runs) / f"seed{seed}"
        cfg = DataConfig(
            name="fashion_mnist", batch_size=args.batch_size, val_size=5000, train_size=args.train_size
        )
        self.train = train_loader(cfg, load_split(cfg, "train", seed), seed=seed, rank=0, world_size=1)
        self.val = eval_loader(load_split(cfg, "val", seed))
        test = load_split(cfg, "test", seed)
        if args.test_images:
            test = test.subset(range(min(args.test_images, len(test))))
        self.test = eval_loader(test)
        e, f = args.epochs, args.ft_epochs
        self.scratch = FitConfig(epochs=e, lr=args.lr, weight_decay=args.weight_decay)
        self.pre = FitConfig(epochs=e - f, lr=args.lr, weight_decay=args.weight_decay)
        self.ft = FitConfig(epochs=f, lr=args.ft_lr, weight_decay=args.weight_decay, warmup_epochs=0)
        self.full_macs = count_model_macs(fresh_model(seed), SIZE)
        self.target = int(args.target * self.full_macs)
        self._base: torch.fx.GraphModule | None = None
        self.names: list[str] = []  # runs in the order they were made, for the table

    def base(self) -> torch.fx.GraphModule:
        """The full network trained E - F epochs (kept on disk: every fine-tune starts here)."""
        if self._base is None:
            path = self.root / "base.pt"
            model = fresh_model(self.seed)
            if not path.is_file():
                (self.root / "base.json").unlink(missing_ok=True)  # a result without its weights

            def train_base() -> PruneResult:
                history = fit(model, self.train, self.pre)
                with atomic_path(path) as tmp:
                    torch.save(model.state_dict(), tmp)
                return finish("base", copy.deepcopy(model), SIZE, history=history)

            self.run("base", train_base)
            model.load_state_dict(torch.load(path, weights_only=True))
            self._base = model.eval()
        return self._base

    def run(self, name: str, make) -> dict[str, Any]:
        """``make()`` -> PruneResult, evaluated, exported and cached as ``NAME.json``."""

        def compute() -> dict[str, Any]:
            torch.manual_seed(derive_seed("bench-prune", self.seed, name))
            t0 = time.perf_counter()
            result = make()
            seconds = time.perf_counter() - t0
            export_onnx(result, self.root / f"{name}.onnx")
            row = {"name": name, **result.summary(), "train_seconds": seconds}
            row["val_accuracy"] = accuracy(result.model, self.val)
            row["test_accuracy"] = accuracy(result.model, self.test)
            return row

        row = cached_json(self.root / f"{name}.json", compute)
        self.names.append(name)
        print(
            f"seed {self.seed} {name:<14} val {row['val_accuracy']:.2f}  test {row['test_accuracy']:.2f}  "
            f"MMACs {row['macs'] / 1e6:.2f} (nominal {row['nominal_macs'] / 1e6:.2f})  "
            f"params {row['nonzero_params']:,}/{row['params']:,}  {row['train_seconds']:.0f} s",
            flush=True,
        )
        return row

    # ----------------------------------------------------------------------- the comparisons

    def part_a(self) -> None:
        base = self.base()
        dcff = self.run("dcff", lambda: dcff_train(fresh_model(self.seed), SIZE, self.train, self.scratch,
                                                   target_macs=self.target, include="all"))  # fmt: skip
        widths = dcff["widths"]
        self.run("l1_all", lambda: prune_l1(base, SIZE, widths=widths, train=self.train, finetune=self.ft))
        self.run("scratch_all", lambda: train_from_scratch(base, SIZE, widths=widths, seed=self.seed,
                                                           train=self.train, fit_config=self.scratch))  # fmt: skip

    def part_b(self) -> None:
        base = self.base()
        wb = self.run("whitebox", lambda: whitebox_prune(fresh_model(self.seed), SIZE, 10, self.train,
                                                         self.target, self.pre, self.ft))  # fmt: skip
        widths = wb["widths"]
        self.run("l1_internal", lambda: prune_l1(base, SIZE, target_macs=self.target, include="internal",
                                                 train=self.train, finetune=self.ft))  # fmt: skip
        self.run("random_wb", lambda: prune_random(base, SIZE, widths=widths, seed=self.seed, train=self.train,
                                                   finetune=self.ft))  # fmt: skip
        self.run("scratch_wb", lambda: train_from_scratch(base, SIZE, widths=widths, seed=self.seed,
                                                          train=self.train, fit_config=self.scratch))  # fmt: skip

    def part_c(self) -> None:
        base, s = self.base(), self.args.sparsity
        rows = {}
        for n in (4, 8):
            for rearrange in (True, False):
                name = f"1x{n}{'_rearranged' if rearrange else ''}"
                rows[name] = self.run(name, lambda n=n, r=rearrange: onexn_prune(
                    base, SIZE, n, s, r, train=self.train, finetune=self.ft))  # fmt: skip
        self.run("magnitude", lambda: magnitude_prune(base, SIZE, s, train=self.train, finetune=self.ft))
        params = rows["1x4_rearranged"]["nonzero_params"]
        self.run("l1_params", lambda: prune_l1(base, SIZE, target_params=params, include="all",
                                               train=self.train, finetune=self.ft))  # fmt: skip

    def part_d(self) -> None:
        from dynaslice.train import load_supernet, recalibrate_bn

        net, _ = load_supernet(self.args.supernet)
        candidates = [net.space.uniform(r / 100) for r in range(35, 101, 5)]
        fits = [a for a in candidates if ds.count_macs(net, a, SIZE) <= self.target]
        if not fits:
            raise ValueError(f"no uniform subnet of {self.args.supernet} fits {self.target:,} MACs")
        arch = max(fits, key=lambda a: ds.count_macs(net, a, SIZE))

        def supernet_row() -> PruneResult:
            recalibrate_bn(net, [arch], self.train.ds, num_images=2000, seed=self.seed)
            sub = ds.extract_subnet(net, arch, SIZE)
            return finish("supernet", sub, SIZE, info={"arch": arch.to_dict()}, history=[])

        self.run("supernet", supernet_row)
        self.run("alone", lambda: self._alone(arch))

    def _alone(self, arch) -> PruneResult:
        torch.manual_seed(derive_seed("bench-prune-alone", self.seed))
        net = ds.create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=SIZE[1])
        model = reinitialize(ds.extract_subnet(net, arch, SIZE), seed=self.seed)
        history = fit(model, self.train, self.scratch)
        return finish("alone", model, SIZE, history=history, info={"arch": arch.to_dict()})


def latency_rows(root: Path, repeats: int) -> dict[str, float]:
    """Median onnxruntime latency (ms, batch 1, one thread) of every exported network of a seed."""
    import numpy as np
    import onnxruntime as ort

    from dynaslice.profile import measure_latency

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    x = np.zeros((1, *SIZE), dtype=np.float32)
    sessions = {p.stem: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for p in sorted(root.glob("*.onnx"))}  # fmt: skip
    fns = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for k, s in sessions.items()}
    times = measure_latency(fns, repeats=repeats)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def table(seeds: dict[int, dict[str, dict]]) -> str:
    """Markdown: mean (and std over seeds) of each run's numbers."""
    names = list(next(iter(seeds.values())))
    lines = [
        "| run | MMACs (dense) | MMACs (nominal) | params | non-zero params | val (%) | test (%) | latency (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        rows = [s[name] for s in seeds.values() if name in s]

        def stat(key: str, scale: float = 1.0, fmt: str = ".2f", rows: list[dict] = rows) -> str:
            vals = [r[key] * scale for r in rows if r.get(key) is not None]
            if not vals:
                return "-"
            sd = f" ± {statistics.stdev(vals):{fmt}}" if len(vals) > 1 else ""
            return f"{statistics.mean(vals):{fmt}}{sd}"

        lines.append(
            f"| {name} | {stat('macs', 1e-6)} | {stat('nominal_macs', 1e-6)} | {stat('params', 1, ',.0f')} | "
            f"{stat('nonzero_params', 1, ',.0f')} | "
            f"{stat('val_accuracy')} | {stat('test_accuracy')} | {stat('latency_ms', 1, '.3f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=float, default=2.0, help="training budget of every pipeline (E)")
    ap.add_argument("--ft-epochs", type=float, default=0.5, help="fine-tuning epochs after pruning (F)")
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c", "d"])
    ap.add_argument("--target", type=float, default=0.5, help="MACs target of (a), (b), (d) as a fraction")
    ap.add_argument("--sparsity", type=float, default=0.5, help="weight sparsity of (c)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-size", type=int, default=0, help="train on N images (0: all 55k)")
    ap.add_argument("--test-images", type=int, default=0, help="evaluate on the first N test images (0: all)")
    ap.add_argument("--supernet", default=None, help="supernet checkpoint for part (d)")
    ap.add_argument("--latency", action="store_true", help="measure onnxruntime latency (quiet machine only)")
    ap.add_argument("--latency-repeats", type=int, default=50)
    ap.add_argument("--runs", default="runs/bench_prune", help="cached runs (resumable)")
    ap.add_argument("--out", default="bench/out/prune.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not 0 < args.ft_epochs < args.epochs:
        ap.error("--ft-epochs must lie strictly between 0 and --epochs")
    if "d" in args.parts and not args.supernet:
        ap.error("part d needs --supernet CHECKPOINT")
    torch.set_num_threads(args.threads)

    results: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        bench = Bench(args, seed)
        for part in args.parts:
            getattr(bench, f"part_{part}")()
        rows = {name: json.loads((bench.root / f"{name}.json").read_text()) for name in bench.names}
        if args.latency:
            for name, ms in latency_rows(bench.root, args.latency_repeats).items():
                rows[name]["latency_ms"] = ms
        results[seed] = rows
    text = table(results)
    atomic_write_json(
        args.out,
        {"args": vars(args), "threads": torch.get_num_threads(), "seeds": results, "table": text},
        indent=1,
    )
    print("\n" + text + f"\n\nwrote {args.out}")


if __name__ == "__main__":
    main()
