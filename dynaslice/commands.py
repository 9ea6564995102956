"""``dynaslice demo``: the main job (:mod:`dynaslice.pipeline`) on the quick Fashion-MNIST preset."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import UserError

# configs/ sits next to the package in a source checkout (where `make demo` runs)
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def demo(args: argparse.Namespace) -> int:
    """``dynaslice run configs/demo.yaml --out runs/demo``, with ``--data-dir`` as ``data.root``."""
    from .pipeline import _run

    config = DEMO_CONFIG if DEMO_CONFIG.is_file() else Path("configs/demo.yaml")
    if not config.is_file():
        raise UserError("configs/demo.yaml not found: run dynaslice demo from a source checkout of dynaslice")
    overrides = [f"data.root={args.data_dir}"] if args.data_dir else []
    return _run(argparse.Namespace(config=str(config), out=args.out, set=overrides, until=None))


def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the main job on Fashion-MNIST in minutes (dynaslice run configs/demo.yaml)"
    )
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.set_defaults(func=demo)
