"""Supernet vs networks trained alone, at equal epochs (issue 15: goals a, b and e).

For each seed, on Fashion-MNIST (``--config``, default configs/fmnist_bench.yaml, full training
split minus the config's validation images unless ``--set data.train_size=N``):

- **static**: one ordinary network per width (x0.35/0.5/0.75/1), each trained alone with the
  labels for ``--epochs`` E epochs (same augmentation and schedule as the supernet's phases);
- **supernet** (``--recipe``):
  ``teacher`` (the recommended recipe): phase 1 trains the largest network alone for
  ``round(E * --phase1)`` epochs; phase 2 starts the supernet from it (``train.init_from``),
  sorts its channels by importance (``train.order_channels``) and trains the sandwich for the
  remaining epochs with the phase-1 network, frozen, as the teacher of every subnet
  (``train.target=teacher``); all phases count towards E.
  ``ib``: today's default, the IB sandwich from scratch for E epochs.
  ``--from-static``: the main road of a user who has a trained model. Phase 1 is the x1 network
  trained alone for E epochs above; phase 2 the same ``E - round(E * --phase1)`` epochs. The
  supernet then trains for more than E epochs, so its fair comparison is wall-clock (b): phase 1
  plus phase 2 against the four networks trained alone.

Every network is BN-recalibrated per width (2000 training images), then evaluated on the
validation split (decisions) and the 10k-image test split (the goals). Reported per width: the
mean over seeds and each seed's value; the supernet-minus-static gap; goal (a) every width at or
above static and the two narrowest at least +0.3 points; (e) largest >= 93.5 % test top-1;
(b) wall-clock of the supernet (all phases) against the sum of the four static trainings
(meaningful only on a quiet machine, from runs trained in one go: a run resumed from an earlier
session reports null).

    python bench/bench_accuracy.py --seeds 0 1 2 --epochs 12 --threads 2 --out bench/out/accuracy.json
    python bench/bench_accuracy.py --seeds 0 --epochs 4 --set data.train_size=20000 --threads 1
    python bench/bench_accuracy.py summary bench/out/acc_seed*.json --out bench/out/acc.json   # seeds run apart
    python bench/bench_accuracy.py compare A.json B.json --out bench/out/a_vs_b.json   # two recipes, paired
    python bench/bench_accuracy.py table runs/acc/*_s0            # val/test per width of finished runs
    python bench/bench_accuracy.py ordering runs/acc/p1_e2_s0     # what channel ordering alone buys
    python bench/bench_accuracy.py routes runs/demo/stage1          # a gated run's routes (val / test)
    python bench/bench_accuracy.py gate-init runs/acc/seed0/static_w1   # a new gate on a trained network
    python bench/bench_accuracy.py gated runs/gated_s* --static bench/out/acc.json --out g.json   # goal (c)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import mean_se, set_threads, write_results

from dynaslice import count_macs, create_supernet, runs
from dynaslice.archspec import uniform_archs
from dynaslice.config_base import ConfigError
from dynaslice.modelfile import CheckpointError
from dynaslice.ordering import reorder_channels
from dynaslice.train import evaluate, load_config, load_supernet, recalibrate_bn, train
from dynaslice.train.config import from_dict
from dynaslice.train.data import eval_loader, load_split

WIDTHS = [0.35, 0.5, 0.75, 1.0]
FULL = ["data.val_size=5000", "data.train_size=0"]  # issue 15: the full training split minus 5k val
# Phase-2 settings of each recipe (on top of --config and --set); see docs/ACCURACY_NOTES.md.
RECIPES: dict[str, dict[str, Any]] = {
    "teacher": {
        "phase1": 0.5,
        "overrides": ["train.target=teacher", "train.order_channels=true"],
    },
    "ib": {"phase1": 0.0, "overrides": ["train.target=ib"]},
}


def run_rows(run: Path, split: str) -> list[dict[str, Any]]:
    """Accuracy per width of a finished run (its BN-recalibrated weights) on ``split``."""
    if split == "val":
        return json.loads((run / "final_eval.json").read_text())
    net, meta = load_supernet(run / "recalibrated.safetensors")
    archs = {name: net.space.validate(a) for name, a in meta["recalibrated"].items()}
    cfg = from_dict(meta["config"])
    data = load_split(cfg.data, split, cfg.train.seed)
    return evaluate(net, archs, eval_loader(data), input_size=net.input_size)


def accuracies(run: Path) -> dict[str, dict[str, float]]:
    """``{"x0.5": {"val": .., "test": ..}, ...}`` of a run, or of every ``static-x*`` in it."""
    subs = sorted(run.glob("static-x*"), key=lambda p: float(p.name[len("static-x") :])) or [run]
    out: dict[str, dict[str, float]] = {}
    for sub in subs:
        for split in ("val", "test"):
            for r in run_rows(sub, split):
                out.setdefault(r["name"], {})[split] = r["accuracy"]
    return out


def timed_train(cfg, run: Path) -> float | None:
    """Train (or resume) ``run``; its wall-clock seconds, or None if it was (partly) trained before."""
    fresh = not run.exists()
    t0 = time.perf_counter()
    train(cfg, run, resume=True)
    return time.perf_counter() - t0 if fresh else None


def phase1_epochs(args: argparse.Namespace) -> int:
    """Epochs of phase 1 out of E; refuses a split that leaves phase 2 nothing before anything trains."""
    e1 = round(args.epochs * (args.phase1 if args.phase1 is not None else RECIPES[args.recipe]["phase1"]))
    if not 0 <= e1 < args.epochs:
        raise SystemExit(f"--phase1 {args.phase1} of --epochs {args.epochs} leaves phase 2 no epoch")
    return e1


def run_seed(args: argparse.Namespace, seed: int, e1: int) -> dict[str, Any]:
    """One seed: the four networks alone, then the supernet's phases (phase 1 of ``e1`` epochs)."""
    root = Path(args.runs) / f"seed{seed}"
    base = [
        f"train.seed={seed}",
        f"train.threads={args.threads}",
        "train.eval_every_epochs=0",
        *FULL,
        *args.set,
    ]
    recipe = RECIPES[args.recipe]
    static_seconds: dict[str, float | None] = {}
    for w in WIDTHS:  # one run each, so each is timed on its own
        cfg = load_config(args.config, [*base, f"train.epochs={args.epochs}", f"train.static_widths=[{w}]"])
        static_seconds[f"x{w:g}"] = timed_train(cfg, root / f"static_w{w:g}")
    e2 = args.epochs - e1
    phase_seconds = []
    init = []
    if args.from_static:  # a trained model to start from: the x1 network trained alone above
        phase_seconds.append(static_seconds["x1"])
        init = [f"train.init_from={root / 'static_w1'}"]
    elif e1 > 0:
        cfg = load_config(args.config, [*base, f"train.epochs={e1}", "train.static_widths=[1.0]", *args.phase1_set])
        phase_seconds.append(timed_train(cfg, root / "phase1"))
        init = [f"train.init_from={root / 'phase1'}"]
    over = [*base, f"train.epochs={e2}", *recipe["overrides"], *init, *args.recipe_set]
    phase_seconds.append(timed_train(load_config(args.config, over), root / "supernet"))
    static = {}
    for w in WIDTHS:
        static.update(accuracies(root / f"static_w{w:g}"))
    known = [s for s in static_seconds.values() if s is not None]
    return {
        "seed": seed,
        "phase1_epochs": args.epochs if args.from_static else e1,
        "phase2_epochs": e2,
        "from_static": args.from_static,
        "static": static,
        "supernet": accuracies(root / "supernet"),
        "static_seconds": static_seconds,
        "static_seconds_sum": sum(known) if len(known) == len(WIDTHS) else None,
        "supernet_seconds": sum(phase_seconds) if None not in phase_seconds else None,
        "supernet_phase_seconds": phase_seconds,
        "overrides": over,
        "phase1_overrides": args.phase1_set,  # cmd_run refused them where there is no phase 1
    }


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds, gaps and the goals of issue 15."""
    rows = {}
    for w in (f"x{w:g}" for w in WIDTHS):
        row: dict[str, Any] = {}
        for kind in ("static", "supernet"):
            for split in ("val", "test"):
                vals = [s[kind][w][split] for s in seeds]
                row[f"{kind}_{split}"] = statistics.mean(vals)
                row[f"{kind}_{split}_seeds"] = vals
        row["gap_test"] = row["supernet_test"] - row["static_test"]
        row["gap_val"] = row["supernet_val"] - row["static_val"]
        rows[w] = row
    narrow = ("x0.35", "x0.5")
    goal_a = all(r["gap_test"] >= 0 for r in rows.values()) and all(
        rows[w]["gap_test"] >= 0.3 for w in narrow
    )
    sup = [s["supernet_seconds"] for s in seeds]
    sta = [s["static_seconds_sum"] for s in seeds]
    timing = None
    if None not in sup and None not in sta:
        timing = {"supernet_s": statistics.mean(sup), "static_sum_s": statistics.mean(sta)}
        timing["ratio"] = timing["supernet_s"] / timing["static_sum_s"]
    return {
        "widths": rows,
        "goal_a": goal_a,
        "goal_e_largest_test": rows["x1"]["supernet_test"],
        "goal_e": rows["x1"]["supernet_test"] >= 93.5,
        "goal_b_timing": timing,
    }


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| width | static val | supernet val | static test | supernet test | gap test |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w, r in summary["widths"].items():
        lines.append(
            f"| {w} | {r['static_val']:.2f} | {r['supernet_val']:.2f} | {r['static_test']:.2f} | "
            f"{r['supernet_test']:.2f} | {r['gap_test']:+.2f} |"
        )
    return "\n".join(lines)


def check_overrides(args: argparse.Namespace) -> None:
    """Read each flag's overrides once before anything trains: a typo in ``--recipe-set`` stops
    here in one line, not after the networks alone have trained for an hour."""
    for flag, extra in (("--set", []), ("--phase1-set", args.phase1_set), ("--recipe-set", args.recipe_set)):
        try:
            load_config(args.config, [*args.set, *extra])
        except ConfigError as e:
            raise SystemExit(f"{flag}: {e}") from None


def cmd_run(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    e1 = phase1_epochs(args)  # before anything trains: a bad split stops here
    if args.phase1_set and (args.from_static or e1 == 0):
        raise SystemExit("--phase1-set needs a phase 1 of this benchmark (not --from-static, --phase1 > 0)")
    check_overrides(args)
    seeds = []
    for seed in args.seeds:
        seeds.append(run_seed(args, seed, e1))
        print(f"seed {seed}: {json.dumps(seeds[-1]['supernet'])}", flush=True)
    summary = summarise(seeds)
    out = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "seeds": seeds, "summary": summary}
    print(markdown(summary))
    print(f"goal (a): {summary['goal_a']}, (e): {summary['goal_e']}, (b): {summary['goal_b_timing']}")
    write_results(args.out, out)


def cmd_table(args: argparse.Namespace) -> None:
    """Val / test per width of finished runs, one line each (the research notes' tables)."""
    print("| run | " + " | ".join(f"x{w:g} val / test" for w in WIDTHS) + " |")
    print("| --- |" + " ---: |" * len(WIDTHS))
    for run in args.run_dirs:
        try:
            acc = accuracies(Path(run))
        except (OSError, KeyError, ValueError) as e:
            print(f"| {run} | not finished ({type(e).__name__}) |")
            continue
        cells = [
            f"{acc[w]['val']:.2f} / {acc[w]['test']:.2f}" if w in acc else "-"
            for w in (f"x{w:g}" for w in WIDTHS)
        ]
        print(f"| {Path(run).name} | " + " | ".join(cells) + " |", flush=True)


def trained_network(run: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of a static run (its x1 network, BN recalibrated) or of a model file or run;
    one line if there is none."""
    largest = run / runs.static_name(1.0)
    try:
        return load_supernet(largest / runs.RECALIBRATED if largest.is_dir() else run)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None


def cmd_ordering(args: argparse.Namespace) -> None:
    """Each width of a trained network's slices after BN recalibration, without and with ordering."""
    run = Path(args.run)
    net, meta = trained_network(run)
    cfg = from_dict(meta["config"])
    t = cfg.train
    train_ds = load_split(cfg.data, "train", t.seed)
    splits = {s: eval_loader(load_split(cfg.data, s, t.seed)) for s in ("val", "test")}
    archs = uniform_archs(net, WIDTHS)
    result = {}
    for name, ordered in (("unordered", False), ("ordered", True)):
        n = copy.deepcopy(net)
        if ordered:
            reorder_channels(n)
        recalibrate_bn(n, list(archs.values()), train_ds, t.recal_images, t.recal_batch_size, seed=t.seed)
        result[name] = {
            s: {r["name"]: r["accuracy"] for r in evaluate(n, archs, b, input_size=n.input_size)}
            for s, b in splits.items()
        }
        cells = [f"{result[name]['val'][w]:.2f} / {result[name]['test'][w]:.2f}" for w in archs]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.out:
        write_results(args.out, {"run": str(run), **result})


def cmd_routes(args: argparse.Namespace) -> None:
    """Each route of a gated Stage-I run after BN recalibration for the routes (the demo's goal)."""
    from dynaslice.train.stage2 import recalibrate_routes

    for run in args.run_dirs:
        net, meta = load_supernet(run)
        cfg = from_dict(meta["config"])
        recalibrate_routes(net, cfg)
        archs = net.named_routes()  # {route0: arch, ...}
        cells = []
        for split in ("val", "test"):
            rows = evaluate(
                net, archs, eval_loader(load_split(cfg.data, split, cfg.train.seed)), net.input_size
            )
            cells.append({r["name"]: r["accuracy"] for r in rows})
        print(
            f"| {Path(run).name} | "
            + " | ".join(f"{cells[0][a]:.2f} / {cells[1][a]:.2f}" for a in archs)
            + " |"
        )


def interpolate(x: float, points: list[tuple[float, float]]) -> float:
    """``y`` at ``x`` on the line through the two ``(x, y)`` points around it (sorted by ``x``)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise ValueError(f"{x:g} lies outside {points[0][0]:g}..{points[-1][0]:g}: no two points around it")


def static_macs(model: str, input_size: tuple[int, ...], num_classes: int) -> dict[str, int]:
    """MACs per image of each width's network alone (the uniform subnets of a gate-less supernet)."""
    net = create_supernet(model, in_chans=input_size[0], input_size=input_size[-1], num_classes=num_classes)
    archs = uniform_archs(net, WIDTHS)
    return dict(zip(archs, count_macs(net, list(archs.values()), input_size), strict=True))


def cmd_gated(args: argparse.Namespace) -> None:
    """Goal (c): each gated model of ``dynaslice run`` directories against the networks alone of
    the same seed (``--static``: a bench_accuracy.py result), interpolated linearly in MACs."""
    static = {}
    for f in args.static:
        for s in seed_rows(f):
            if "static" not in s:
                raise SystemExit(f"{f}: seed {s.get('seed')} has no networks alone (no 'static' results)")
            static[s["seed"]] = s["static"]
    rows: dict[str, list[dict[str, Any]]] = {}
    for run in map(Path, args.run_dirs):
        evals = sorted((run / "eval").glob("gate-t*.json"))
        if not evals:
            raise SystemExit(f"{run}: no eval/gate-t*.json (run `dynaslice run ... --until eval` first)")
        gated_net, meta = load_supernet(run / "stage1" / "recalibrated.safetensors")
        cfg = from_dict(meta["config"])
        seed = cfg.train.seed
        if seed not in static:
            raise SystemExit(f"{run}: seed {seed} has no networks alone in {' '.join(args.static)}")
        macs = static_macs(cfg.model.name, gated_net.input_size, gated_net.num_classes)
        curve = [(macs[w], static[seed][w]["test"]) for w in macs]
        for file in evals:
            g = json.loads(file.read_text())
            try:
                alone = interpolate(g["avg_macs"], curve)
            except ValueError as e:  # a gated model costlier than x1, or cheaper than x0.35
                raise SystemExit(f"{file}: its MACs {e} of the networks alone") from None
            rows.setdefault(f"{g['target']:g}", []).append(
                {"seed": seed, "run": str(run), "avg_macs": g["avg_macs"], "gated_test": g["accuracy"],
                 "gated_val": g["val_accuracy"], "alone_test": alone, "gap_test": g["accuracy"] - alone,
                 "routes_test": [r["accuracy"] for r in g["routes"]], "routes_macs": [r["macs"] for r in g["routes"]]}
            )  # fmt: skip
    summary = {}
    print("| gate target | avg MMACs | gated (test) | alone at equal MACs | gap |\n| --- | ---: | ---: | ---: | ---: |")
    for target, seeds in rows.items():
        gap = mean_se([r["gap_test"] for r in seeds])
        se = gap["se"]
        summary[target] = {
            key: statistics.mean(r[key] for r in seeds) for key in ("avg_macs", "gated_test", "alone_test")
        } | {"gap_test": gap["mean"], "gap_test_se": se, "seeds": len(seeds)}
        m = summary[target]
        print(
            f"| {target} | {m['avg_macs'] / 1e6:.2f} | {m['gated_test']:.2f} | {m['alone_test']:.2f} | "
            f"{m['gap_test']:+.2f} +- {se or 0:.2f} |"
        )
    goal = all(m["gap_test"] >= 0 for m in summary.values())
    print(f"goal (c), every target at or above the networks alone: {goal}")
    write_results(args.out, {"static": args.static, "targets": rows, "summary": summary, "goal_c": goal})


def cmd_gate_init(args: argparse.Namespace) -> None:
    """What adding a gate to a trained network costs before any training: its largest network's
    validation accuracy alone and inside a gated supernet whose new attention head scales every
    channel by each of ``--scales`` (``train.init_from`` uses 0.98, DynamicGate.start_near_identity)."""
    from dynaslice.gate import GatedSupernet
    from dynaslice.gate.module import check_identity_scale

    for scale in args.scales:  # before the network is read
        try:
            check_identity_scale(scale)
        except ValueError as e:
            raise SystemExit(f"--scales: {e}") from None
    run = Path(args.run)
    net, meta = trained_network(run)
    cfg = from_dict(meta["config"])
    val = eval_loader(load_split(cfg.data, "val", cfg.train.seed))
    net.eval()
    result = {"alone": evaluate(net, {"x1": net.space.largest()}, val, net.input_size)[0]["accuracy"]}
    print(f"alone: {result['alone']:.2f}", flush=True)
    for scale in args.scales:
        gated = GatedSupernet(copy.deepcopy(net), cut=args.cut, routes=2).eval()
        gated.gate.start_near_identity(scale)
        acc = evaluate(gated, {"x1": gated.space.largest()}, val, gated.input_size)[0]["accuracy"]
        result[f"{scale:g}"] = acc
        print(f"gated, attention {scale:g}: {acc:.2f}", flush=True)
    if args.out:
        write_results(args.out, {"run": str(run), "cut": args.cut, "val": result})


def seed_rows(file: str) -> list[dict[str, Any]]:
    """The per-seed rows of a benchmark JSON (one seed's run, or a summary); one line if it is not one."""
    try:
        return json.loads(Path(file).read_text())["seeds"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{file}: not a bench_accuracy.py result ({type(e).__name__}: {e})") from None


def cmd_summary(args: argparse.Namespace) -> None:
    """One summary of seeds run as separate commands (one seed per core): their JSONs -> ``--out``."""
    seeds = [s for f in args.files for s in seed_rows(f)]
    summary = summarise(seeds)
    for w, r in summary["widths"].items():
        gap = mean_se([a - b for a, b in zip(r["supernet_test_seeds"], r["static_test_seeds"], strict=True)])
        r["gap_test_se"] = gap["se"]
        print(f"{w}: paired test gap {gap['mean']:+.2f} +- {gap['se'] or 0:.2f} over {gap['n']} seeds")
    print(markdown(summary))
    write_results(args.out, {"files": args.files, "seeds": seeds, "summary": summary})


def cmd_compare(args: argparse.Namespace) -> None:
    """Two recipes' supernets, paired per seed (same seeds, same networks alone): ``A - B`` per
    width (test and val, mean +- s.e.) and the ratio of their training times."""
    runs = [{s["seed"]: s for s in seed_rows(f)} for f in (args.a, args.b)]
    common = sorted(set(runs[0]) & set(runs[1]))
    if not common:
        raise SystemExit(f"{args.a} and {args.b} share no seed")
    out: dict[str, Any] = {"a": args.a, "b": args.b, "seeds": common, "widths": {}}
    print(f"| width | A - B test (mean +- s.e., {len(common)} seeds) | A - B val |\n| --- | ---: | ---: |")
    for w in (f"x{w:g}" for w in WIDTHS):
        row = {}
        for split in ("test", "val"):
            gaps = [runs[0][s]["supernet"][w][split] - runs[1][s]["supernet"][w][split] for s in common]
            gap = mean_se(gaps)
            row[split] = {"mean": gap["mean"], "se": gap["se"], "seeds": gaps}
        out["widths"][w] = row
        print(f"| {w} | " + " | ".join(f"{row[k]['mean']:+.2f} +- {row[k]['se'] or 0:.2f}" for k in ("test", "val")) + " |")
    seconds = [(runs[0][s]["supernet_seconds"], runs[1][s]["supernet_seconds"]) for s in common]
    if all(a and b for a, b in seconds):
        out["seconds_ratio"] = [a / b for a, b in seconds]
        print("training time A / B per seed: " + ", ".join(f"{r:.2f}" for r in out["seconds_ratio"]))
    write_results(args.out, out)


def _files_out(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)


def _compare_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("a", help="summary JSON of recipe A (bench_accuracy.py summary ...)")
    ap.add_argument("b", help="summary JSON of recipe B, same seeds")
    ap.add_argument("--out", required=True)


def _gated_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("run_dirs", nargs="+", help="dynaslice run directories (one per seed)")
    ap.add_argument("--static", nargs="+", required=True, help="bench_accuracy.py results with the networks alone")
    ap.add_argument("--out", required=True)


def _gate_init_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("run", help="a static run (its static-x1) or a model file")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    ap.add_argument("--cut", type=int, default=1, help="the stage the gate sits before (the demo's: 1)")
    ap.add_argument("--out", default=None)


def _run_dirs(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("run_dirs", nargs="+")


def _run_out(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("run")
    ap.add_argument("--out", default=None)


# name -> (command, its arguments); without one of these names the arguments are a run's
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], Callable[[argparse.ArgumentParser], None]]] = {
    "summary": (cmd_summary, _files_out),
    "compare": (cmd_compare, _compare_args),
    "gated": (cmd_gated, _gated_args),
    "gate-init": (cmd_gate_init, _gate_init_args),
    "table": (cmd_table, _run_dirs),
    "routes": (cmd_routes, _run_dirs),
    "ordering": (cmd_ordering, _run_out),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        command, add_args = SUBCOMMANDS[argv[0]]
        ap = argparse.ArgumentParser(prog=f"bench_accuracy.py {argv[0]}", description=command.__doc__)
        add_args(ap)
        command(ap.parse_args(argv[1:]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/fmnist_bench.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--epochs", type=int, default=12, help="E: epochs of each static network and of the supernet"
    )
    ap.add_argument("--recipe", choices=list(RECIPES), default="teacher")
    ap.add_argument("--phase1", type=float, default=None, help="fraction of E that trains the largest alone")
    ap.add_argument(
        "--from-static",
        action="store_true",
        help="phase 1 is the x1 network trained alone for E epochs (a user's trained model); "
        "the supernet then costs that plus phase 2: compare at equal wall-clock (b), not equal epochs",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for every run")
    ap.add_argument(
        "--recipe-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for the supernet phase",
    )
    ap.add_argument(
        "--phase1-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for phase 1 (the largest alone), e.g. train.zero_init_last_bn=true",
    )
    ap.add_argument("--runs", default="runs/bench_accuracy")
    ap.add_argument("--out", default="bench/out/accuracy.json")
    cmd_run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
