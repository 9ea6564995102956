"""``dynaslice prune METHOD``: one compact network from a config's model (:func:`dynaslice.prune.prune_run`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import runs
from ..prune import prune_run, pruner, pruner_names
from ..train.config import load_config
from .common import UserError, add_set, parse_share


def _prune(args: argparse.Namespace) -> int:
    if args.target_macs is not None and args.target_params is not None:
        raise UserError("give one budget: --target-macs or --target-params, not both")
    overrides = [f"prune.method={args.method}", *args.set]
    if args.target_macs is not None:
        overrides += [f"prune.target_macs={args.target_macs!r}", "prune.target_params=null"]
    if args.target_params is not None:
        overrides += [f"prune.target_params={args.target_params!r}", "prune.target_macs=null"]
    cfg = load_config(args.config, overrides)
    note = pruner(args.method).note
    if note is not None and (advice := note(cfg)):
        print(f"note: {advice}", file=sys.stderr)
    out = Path(args.out) if args.out else Path("runs") / f"prune-{args.method}"
    result = prune_run(cfg, out, resume=args.resume)
    acc = result["accuracy"]
    print(
        f"{result['name']}: val top-1 {'-' if acc is None else f'{acc:.2f}%'}, "
        f"{result['macs'] / 1e6:.2f} MMACs (nominal {result['nominal_macs'] / 1e6:.2f}) of "
        f"{result['full_macs'] / 1e6:.2f}, {result['nonzero_params']:,} non-zero of {result['params']:,} params"
    )
    print(f"compact network: {out / runs.PRUNED_MODEL}, {out / runs.PRUNED_ONNX}; results: {out / runs.FINAL_EVAL}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune the config's network into one compact network (DCFF, White-Box, 1xN, baselines)",
        description="Train and prune the config's network (its largest subnet, as a plain model) with one "
        "method; writes RUN/model.pt, RUN/model.onnx and RUN/final_eval.json. Settings: the prune: section "
        "of the config (see configs/prune.yaml).",
    )
    methods = pruner_names()
    p.add_argument("method", choices=methods, metavar="METHOD", help=" | ".join(methods))
    p.add_argument("--config", default="prune", help="YAML file or preset name (default: prune)")
    p.add_argument(
        "--target-macs", type=parse_share, default=None, metavar="X",
        help="MACs of the compact network: a share of the full network's (0.5 or 50%%), or MACs like 14M",
    )  # fmt: skip
    p.add_argument(
        "--target-params", type=parse_share, default=None, metavar="X",
        help="parameters of the compact network: a share of the full network's (0.5, 50%%) or a count (200k)",
    )  # fmt: skip
    add_set(p, "prune.finetune_epochs=0.5")
    p.add_argument("--out", default=None, help="run directory (default: runs/prune-METHOD)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(func=_prune)
