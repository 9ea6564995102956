"""``dynaslice run CONFIG`` (the main job, :mod:`dynaslice.pipeline`) and ``dynaslice demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..pipeline import load_run_config, run_pipeline
from .common import add_set, default_run_dir


def run(config: str, out: str | None, overrides: list[str], until: str | None = None) -> int:
    cfg, settings = load_run_config(config, overrides)
    out_dir = Path(out) if out else default_run_dir(config)
    report = run_pipeline(cfg, settings, out_dir, until)
    if report.is_file():
        print(f"report: {report}")
    else:
        print(f"stopped after step {until!r}; run the same command without --until to finish: {out_dir}")
    return 0


def _run(args: argparse.Namespace) -> int:
    return run(args.config, args.out, args.set, args.until)


def _demo(args: argparse.Namespace) -> int:
    """``dynaslice run demo --out runs/demo``, with ``--data-dir`` as ``data.root``."""
    overrides = [f"data.root={args.data_dir}"] if args.data_dir else []
    return run("demo", args.out, overrides)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="the main job: Stage I, BN recalibration, Stage II, test evaluation, export, report",
        description="Train a gated supernet and its gate from one YAML config, evaluate, export and "
        "write RUN/report.md. Re-running skips finished steps and resumes an interrupted one.",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML file or preset name, e.g. demo")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    add_set(p, "train.epochs=2 or run.gate_targets=[0.6]")
    p.add_argument("--until", default=None, metavar="STEP", help="stop after this step (e.g. stage1)")
    p.set_defaults(func=_run)

    p = sub.add_parser("demo", help="the main job on Fashion-MNIST in minutes (dynaslice run demo)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.set_defaults(func=_demo)
