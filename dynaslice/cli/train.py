"""``dynaslice train``, ``train-gate``, ``recalibrate`` and ``eval``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import runs
from ..archspec import parse_archs
from ..atomic import atomic_write_json
from ..gate import GatedSupernet
from ..lm.train import is_lm_config, train_lm
from ..modelfile import CheckpointError, load_model_file, prefixed, save_model_file
from ..models.base import Supernet
from ..space import Arch
from ..train import evaluate, evaluate_gated, format_gated, format_rows, recalibrate_bn, train, train_gate
from ..train.config import Config, apply_override, load_config, read_config_file
from ..train.data import eval_loader, load_split
from ..train.stage2 import needs_recalibration, recalibrate_routes
from .common import (
    UserError,
    add_set,
    add_trust_factory,
    default_run_dir,
    load_run_model,
    parse_share,
    positive_int,
    refuse_existing,
    run_dir_arg,
    trusted_data,
)


def _train(args: argparse.Namespace) -> int:
    changes = [a.partition("=")[0].strip() for a in args.allow_change]
    if changes and not args.resume:
        raise UserError("--allow-change goes with --resume (it changes a run that exists)")
    run_keys = [a for a in args.set if a.strip().startswith("run.")]
    if run_keys:
        raise UserError(f"--set {run_keys[0]}: run.* settings belong to dynaslice run (the whole job), not to train")
    if "run" in read_config_file(args.config):
        print(
            f"note: {args.config} has a run: section (settings of dynaslice run, the whole job); "
            "dynaslice train trains the supernet only and ignores it",
            file=sys.stderr,
        )
    cfg = load_config(args.config, args.set + args.allow_change, ignore=("run",))
    out = run_dir_arg(Path(args.out) if args.out else default_run_dir(args.config))
    (train_lm if is_lm_config(cfg) else train)(cfg, out, resume=args.resume, allow_changes=changes)
    return 0


def _recalibrate_net(net: Supernet, cfg: Config, archs: dict[str, Arch], images: int | None) -> None:
    if cfg.data.name == "folder":
        raise UserError("recalibration from a folder dataset is not wired into the CLI yet; use recalibrate_bn")
    train_ds = load_split(cfg.data, "train", cfg.train.seed)
    n = images or cfg.train.recal_images
    recalibrate_bn(net, list(archs.values()), train_ds, n, cfg.train.recal_batch_size, seed=cfg.train.seed)


def _recalibrated_out(args: argparse.Namespace, net: Supernet, file: Path, archs: dict[str, Arch]) -> Path:
    """Where ``recalibrate`` writes, refusing to replace what it should not.

    Default, in a run directory: ``recalibrated.safetensors``, the file ``train`` writes at its end
    for the eval widths (what ``export`` and ``train.init_from`` take for them), or for a gated net's
    routes ``routes-recalibrated.safetensors``, the name ``dynaslice run`` gives that file (what
    Stage II starts from). A default output that holds the same subnets from the same weights is
    this command's own result, recomputed: it is replaced, so ``recalibrate RUN`` works right after
    ``train``. Any other existing file (other subnets, an explicit ``--out``) needs ``--force``.
    """
    if args.out:
        out = Path(args.out)
        refuse_existing(out, "recalibrated model", args.force)
        return out
    if Path(args.ckpt).is_dir():
        routes = isinstance(net, GatedSupernet) and set(archs.values()) == set(net.routes)
        out = Path(args.ckpt) / (runs.ROUTES_RECALIBRATED if routes else runs.RECALIBRATED)
    else:
        out = file.with_name(file.stem + "-recal.safetensors")
    if out.is_file() and not args.force:
        try:
            held = load_model_file(out)[1]
        except CheckpointError:
            held = {}
        same = {Arch(a) for a in (held.get("recalibrated") or {}).values()} == set(archs.values())
        if not (same and held.get("weights", "model") == args.weights):
            what = ", ".join(held.get("recalibrated") or {}) or "unknown subnets"
            raise UserError(
                f"{out} exists and holds BN statistics for other subnets or weights ({what}): "
                f"pass --out FILE for {', '.join(archs)}, or --force to replace it"
            )
    refuse_existing(out, "recalibrated model", force=True)  # a writable place, not a directory
    return out


def _recalibrate(args: argparse.Namespace) -> int:
    net, meta, cfg, file = load_run_model(args.ckpt, args.weights, args.trust_factory)
    cfg = trusted_data(cfg, args.data_dir)
    default = ["routes"] if isinstance(net, GatedSupernet) else ["uniform"]
    archs = parse_archs(args.archs or default, net, cfg.train.eval_widths)
    out = _recalibrated_out(args, net, file, archs)
    replaced = out.exists()
    _recalibrate_net(net, cfg, archs, args.images)
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    meta["recalibrated"] = {k: a.to_dict() for k, a in archs.items()}
    meta["weights"] = args.weights  # the file's "model" weights are these (EMA weights with --weights ema)
    save_model_file(out, prefixed("model", net), meta)
    print(
        f"BN statistics recalibrated for {len(archs)} subnet(s) ({', '.join(archs)}): {out}"
        + (" (replaced)" if replaced else "")
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    net, meta, cfg, file = load_run_model(args.ckpt, args.weights, args.trust_factory)
    cfg = trusted_data(cfg, args.data_dir)
    if cfg.data.name == "folder":
        raise UserError("evaluating folder datasets is not wired into the CLI yet; use dynaslice.train.evaluate")
    if args.json:
        refuse_existing(Path(args.json), "JSON results", force=True)
    gated = isinstance(net, GatedSupernet)
    if gated and not args.archs and meta.get("stage") == 2:
        return _eval_gated(args, net, meta, cfg, file)
    if gated and not args.archs:  # Stage I: the slimming head's argmax is noise, not a decision
        print(
            f"note: {file} is a Stage I checkpoint: its gate has not been trained by Stage II "
            "(dynaslice train-gate), so eval reports each route as a static subnet, not the gate",
            file=sys.stderr,
        )
    # a gated checkpoint's --archs are subnets of its backbone supernet, each run as a static subnet
    archs = parse_archs(args.archs or (["routes"] if gated else ["uniform"]), net, cfg.train.eval_widths)
    done = {Arch(a) for a in (meta.get("recalibrated") or {}).values()}
    if args.recalibrate == "yes" or (args.recalibrate == "auto" and not set(archs.values()) <= done):
        _recalibrate_net(net, cfg, archs, None)
        note = "BN recalibrated now"
    else:
        note = "BN statistics from the file"
    data = load_split(cfg.data, args.split, cfg.train.seed)
    rows = evaluate(net, archs, eval_loader(data), input_size=net.input_size)
    kind = "gated supernet, static subnets; " if gated else ""
    print(f"{file} ({kind}{args.weights} weights, {args.split} split, {len(data)} images, {note})")
    print(format_rows(rows))
    if args.json:
        atomic_write_json(args.json, {"checkpoint": str(file), "split": args.split, "rows": rows}, indent=1)
    return 0


def _eval_gated(args: argparse.Namespace, net: GatedSupernet, meta: dict[str, Any], cfg: Config, file: Path) -> int:
    """A Stage-II checkpoint: dynamic (argmax) accuracy, average MACs, route histograms, SGS agreement."""
    if args.recalibrate == "yes" or (args.recalibrate == "auto" and needs_recalibration(net, meta)):
        recalibrate_routes(net, cfg)
        note = "BN recalibrated now for the routes"
    else:
        note = "BN statistics from the file"
    data = load_split(cfg.data, args.split, cfg.train.seed)
    result = evaluate_gated(net, eval_loader(data), data.num_classes, net.input_size)
    print(f"{file} (gated, Stage II; {args.weights} weights, {args.split} split, {len(data)} images, {note})")
    print(format_gated(result))
    if args.json:
        atomic_write_json(args.json, {"checkpoint": str(file), "split": args.split, "gated": result}, indent=1)
    return 0


def _train_gate(args: argparse.Namespace) -> int:
    net, meta, cfg, file = load_run_model(args.ckpt, args.weights, args.trust_factory)
    cfg = trusted_data(cfg, args.data_dir)
    if not isinstance(net, GatedSupernet):
        raise UserError(
            f"{file} is not a gated supernet: train Stage I with model.gate.enabled=true "
            "(the gate's attention head trains with the supernet)"
        )
    overrides = list(args.set)
    if args.target_macs is not None:
        overrides.append(f"stage2.target_macs={args.target_macs!r}")
    if args.epochs is not None:
        overrides.append(f"stage2.epochs={args.epochs}")
    if args.drop_hopeless:
        overrides.append("stage2.drop_hopeless=true")
    for assignment in overrides:
        cfg = apply_override(cfg, assignment)
    cfg.validate()
    if args.out:
        out = run_dir_arg(Path(args.out))
    elif runs.checkpoints_dir(args.ckpt).is_dir():
        out = Path(args.ckpt) / runs.gate_name(cfg.stage2.target_macs)
    else:
        raise UserError(f"pass --out DIR: {args.ckpt} is not a run directory to put the Stage-II run in")
    recal = args.recalibrate == "yes" or (args.recalibrate == "auto" and needs_recalibration(net, meta))
    result = train_gate(net, cfg, out, meta, recalibrate=recal, resume=args.resume)
    if result:
        print(f"Stage II done: {out} (validation split, BN recalibrated for the routes)")
        print(format_gated(result))
    else:
        print(f"Stage II done: {out} (no validation split: data.val_size is 0)")
    return 0


# --------------------------------------------------------------------------- parsers


def _checkpoint_args(p: argparse.ArgumentParser, archs: str = "") -> None:
    """The checkpoint, data and weights options; ``archs``: the help of ``--archs`` (none if empty)."""
    p.add_argument("ckpt", metavar="CKPT", help="run directory, checkpoint directory or .safetensors model file")
    if archs:
        p.add_argument("--archs", nargs="+", default=None, metavar="A", help=archs)
    p.add_argument("--weights", choices=("model", "ema"), default="model", help="student or EMA-teacher weights")
    add_trust_factory(p)
    p.add_argument(
        "--data-dir", default=None, metavar="DIR",
        help="where the dataset the checkpoint names lives (default: that dataset's standard place; "
        "a path stored in the checkpoint is never used)",
    )  # fmt: skip


def _recalibrate_choice(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--recalibrate", choices=("auto", "yes", "no"), default="auto", help=help)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a supernet (or static counterparts) from a YAML config")
    p.add_argument(
        "config", metavar="CONFIG",
        help="YAML file or preset name, e.g. fmnist_quick (a run: section, for dynaslice run, is ignored with a note)",
    )  # fmt: skip
    add_set(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's newest intact checkpoint")
    p.add_argument(
        "--allow-change", action="append", default=[], metavar="KEY=VALUE",
        help="with --resume: change optim.lr or optim.clip_grad_norm of the run (e.g. after a divergence); "
        "recorded in its metrics.jsonl and config.yaml",
    )  # fmt: skip
    p.set_defaults(func=_train)

    p = sub.add_parser("train-gate", help="Stage II: train the gate of a gated supernet (the backbone stays frozen)")
    _checkpoint_args(p)
    p.add_argument(
        "--target-macs", type=parse_share, default=None, metavar="X",
        help="average MACs per image to aim for: a share of the widest route's (0.6, 60%%) or MACs like 12M "
        "(default: the config's stage2.target_macs)",
    )  # fmt: skip
    p.add_argument("--epochs", type=positive_int, default=None, help="Stage-II epochs (default: stage2.epochs)")
    p.add_argument("--drop-hopeless", action="store_true", help="no gate target for samples even the widest route gets wrong")
    add_set(p, "stage2.lr=0.1")
    p.add_argument("--out", default=None, help="Stage-II run directory (default: RUN/gate-t<target>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted Stage II in --out")
    _recalibrate_choice(p, "BN recalibration for the routes first (auto: unless the file was recalibrated for them)")
    p.set_defaults(func=_train_gate)

    p = sub.add_parser("recalibrate", help="recompute BN statistics of a checkpoint for the subnets you will use")
    _checkpoint_args(
        p,
        "uniform | largest | smallest | routes | x0.5 | archs.json (default: uniform = the config's eval "
        "widths; a gated checkpoint: its routes)",
    )
    p.add_argument("--images", type=positive_int, default=None, help="training images to use (default: train.recal_images)")
    p.add_argument(
        "--out", default=None,
        help="output model file (default in a run directory: RUN/recalibrated.safetensors, for a gated net's "
        "routes RUN/routes-recalibrated.safetensors, replaced when it holds the same subnets; else next to "
        "the checkpoint file)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=_recalibrate)

    p = sub.add_parser("eval", help="top-1 accuracy and MACs of subnets of a checkpoint")
    _checkpoint_args(
        p,
        "uniform | largest | smallest | routes | x0.5 | archs.json, each a static subnet (default: uniform = "
        "the config's eval widths; a gated checkpoint: its gate and routes after Stage II, "
        "its routes before)",
    )
    p.add_argument("--split", choices=("test", "val"), default="test")
    _recalibrate_choice(p, "auto: recalibrate unless the file was recalibrated for these subnets")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_eval)
