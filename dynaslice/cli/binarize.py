"""``dynaslice binarize METHOD``: train one binary network (:func:`dynaslice.binary.train.binarize_run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..binary.methods import binary_method_names, method
from ..binary.train import MODEL_FILE, binarize_run, load_binary_config
from .common import UserError, add_set, run_dir_arg


def _binarize(args: argparse.Namespace) -> int:
    if args.method not in binary_method_names():  # argparse's choices would print every name as a long usage error
        raise UserError(f"unknown binary method {args.method!r}: choose one of {', '.join(binary_method_names())}")
    cfg, bcfg = load_binary_config(args.config, [*args.set, f"binary.method={args.method}"])
    out = run_dir_arg(Path(args.out) if args.out else Path("runs") / f"binarize-{args.method}")
    result = binarize_run(cfg, bcfg, out, test=args.test)
    test = f", test top-1 {result['test_accuracy']:.2f}%" if args.test else ""
    print(
        f"{args.method}: val top-1 {result['accuracy']:.2f}%{test}, {result['ops'] / 1e6:.3f} M OPs "
        f"({result['flops'] / 1e6:.3f} M FLOPs + {result['bops'] / 1e6:.3f} M BOPs / 64)"
    )
    print(f"binary network: {out / MODEL_FILE}; results: {out / 'final_eval.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "binarize",
        help="train a binary (1-bit) small ResNet by ReCU, SiMaN, the plain BNN or full precision",
        description="Train the binary small ResNet with one method into a new run directory; writes "
        "RUN/model.pt and RUN/final_eval.json (val top-1, OPs). Methods: "
        + "; ".join(f"{k}: {method(k).about}" for k in binary_method_names())
        + ". Settings: the binary: section of the config (see configs/binary.yaml) and the usual sections.",
    )
    p.add_argument("method", metavar="METHOD", help=" | ".join(binary_method_names()))
    p.add_argument("--config", default="binary", help="YAML file or preset name (default: binary)")
    add_set(p, "binary.width_mult=0.5")
    p.add_argument("--test", action="store_true", help="also report top-1 on the whole test split (decide on val)")
    p.add_argument("--out", default=None, help="a new run directory (default: runs/binarize-METHOD)")
    p.set_defaults(func=_binarize)
