"""``dynaslice train``, ``dynaslice train-gate``, ``dynaslice recalibrate`` and ``dynaslice eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..cli import UserError
from ..gate import GatedSupernet
from ..models.base import Supernet
from ..space import Arch
from .bn import recalibrate_bn
from .checkpoint import CheckpointError, load_supernet, resolve_checkpoint, save_model_file
from .config import Config, ConfigError, apply_override, from_dict, load_config
from .data import eval_loader, load_split
from .evaluate import evaluate, format_table, uniform_archs
from .loop import TrainingDiverged, train
from .stage2 import (
    evaluate_gated,
    format_gated,
    needs_recalibration,
    recalibrate_routes,
    route_archs,
    train_gate,
)


def _train(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.set or [])
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        train(cfg, out, resume=args.resume)
    except (TrainingDiverged, ConfigError, CheckpointError) as e:
        raise UserError(str(e)) from e
    return 0


def parse_archs(tokens: list[str], net: Supernet, default_widths: list[float]) -> dict[str, Arch]:
    """``uniform`` (the config's eval widths), ``largest``, ``smallest``, ``routes`` (a gated
    net's routes), a ratio like ``x0.5`` or ``0.5``, or a JSON file holding a list of archs or a
    ``{name: arch}`` mapping."""
    archs: dict[str, Arch] = {}
    for token in tokens:
        if token == "routes":
            if not isinstance(net, GatedSupernet):
                raise UserError(
                    "--archs routes needs a gated checkpoint (trained with model.gate.enabled=true)"
                )
            archs.update(route_archs(net))
        elif token == "uniform":
            archs.update(uniform_archs(net, default_widths))
        elif token in ("largest", "smallest"):
            archs[token] = getattr(net.space, token)()
        elif token.endswith(".json"):
            try:
                data = json.loads(Path(token).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"cannot read archs from {token}: {e}") from None
            items = data.items() if isinstance(data, dict) else ((f"arch{i}", a) for i, a in enumerate(data))
            for name, a in items:
                archs[str(name)] = net.space.validate(a)
        else:
            try:
                ratio = float(token.removeprefix("x"))
            except ValueError:
                raise UserError(
                    f"--archs {token!r}: use uniform, largest, smallest, a width ratio like x0.5, or a .json file"
                ) from None
            archs.update(uniform_archs(net, [ratio]))
    return archs


def _load(path: str, weights: str) -> tuple[Supernet, dict[str, Any], Config, Path]:
    try:
        file = resolve_checkpoint(path)
        net, meta = load_supernet(file, weights)
        cfg = from_dict(meta["config"])
    except (CheckpointError, ConfigError, KeyError) as e:
        raise UserError(str(e)) from e
    return net, meta, cfg, file


def _recalibrate_net(net: Supernet, cfg: Config, archs: dict[str, Arch], images: int | None) -> None:
    if cfg.data.name == "folder":
        raise UserError(
            "recalibration from a folder dataset is not wired into the CLI yet; use recalibrate_bn"
        )
    train_ds = load_split(cfg.data, "train", cfg.train.seed)
    n = images or cfg.train.recal_images
    recalibrate_bn(net, list(archs.values()), train_ds, n, cfg.train.recal_batch_size, seed=cfg.train.seed)


def _recalibrate(args: argparse.Namespace) -> int:
    net, meta, cfg, file = _load(args.ckpt, args.weights)
    if args.data_dir:
        cfg.data.root = args.data_dir
    archs = parse_archs(args.archs or ["uniform"], net, cfg.train.eval_widths)
    _recalibrate_net(net, cfg, archs, args.images)
    if args.out:
        out = Path(args.out)
    elif Path(args.ckpt).is_dir():
        out = Path(args.ckpt) / "recalibrated.safetensors"
    else:
        out = file.with_name(file.stem + "-recal.safetensors")
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    meta["recalibrated"] = {k: a.to_dict() for k, a in archs.items()}
    save_model_file(out, {f"model.{k}": v for k, v in net.state_dict().items()}, meta)
    print(f"BN statistics recalibrated for {len(archs)} subnet(s) ({', '.join(archs)}): {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    net, meta, cfg, file = _load(args.ckpt, args.weights)
    if args.data_dir:
        cfg.data.root = args.data_dir
    if isinstance(net, GatedSupernet):
        return _eval_gated(args, net, meta, cfg, file)
    archs = parse_archs(args.archs or ["uniform"], net, cfg.train.eval_widths)
    done = {Arch(a) for a in (meta.get("recalibrated") or {}).values()}
    if args.recalibrate == "yes" or (args.recalibrate == "auto" and not set(archs.values()) <= done):
        _recalibrate_net(net, cfg, archs, None)
        note = "BN recalibrated now"
    else:
        note = "BN statistics from the file"
    if cfg.data.name == "folder":
        raise UserError(
            "evaluating folder datasets is not wired into the CLI yet; use dynaslice.train.evaluate"
        )
    data = load_split(cfg.data, args.split, cfg.train.seed)
    rows = evaluate(net, archs, eval_loader(data), input_size=net.input_size)
    print(f"{file} ({args.weights} weights, {args.split} split, {len(data)} images, {note})")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"checkpoint": str(file), "split": args.split, "rows": rows}, indent=1)
        )
    return 0


def _eval_gated(
    args: argparse.Namespace, net: GatedSupernet, meta: dict[str, Any], cfg: Config, file: Path
) -> int:
    """A gated checkpoint: dynamic (argmax) accuracy, average MACs, route histograms, SGS agreement."""
    if args.archs:
        raise UserError(
            f"{file} is a gated checkpoint: eval reports its gate and its {len(net.routes)} routes; "
            "--archs is for plain supernets"
        )
    if cfg.data.name == "folder":
        raise UserError(
            "evaluating folder datasets is not wired into the CLI yet; use dynaslice.train.stage2"
        )
    try:
        if args.recalibrate == "yes" or (args.recalibrate == "auto" and needs_recalibration(net, meta)):
            recalibrate_routes(net, cfg)
            note = "BN recalibrated now for the routes"
        else:
            note = "BN statistics from the file"
    except ConfigError as e:
        raise UserError(str(e)) from e
    data = load_split(cfg.data, args.split, cfg.train.seed)
    result = evaluate_gated(net, eval_loader(data), data.num_classes, net.input_size)
    stage = "Stage II" if meta.get("stage") == 2 else "Stage I (slimming head untrained)"
    print(f"{file} (gated, {stage}; {args.weights} weights, {args.split} split, {len(data)} images, {note})")
    print(format_gated(result))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"checkpoint": str(file), "split": args.split, "gated": result}, indent=1)
        )
    return 0


def _train_gate(args: argparse.Namespace) -> int:
    net, meta, cfg, file = _load(args.ckpt, args.weights)
    if not isinstance(net, GatedSupernet):
        raise UserError(
            f"{file} is not a gated supernet: train Stage I with model.gate.enabled=true "
            "(the gate's attention head trains with the supernet)"
        )
    overrides = list(args.set or [])
    if args.target_macs is not None:
        overrides.append(f"stage2.target_macs={args.target_macs!r}")
    if args.epochs is not None:
        overrides.append(f"stage2.epochs={args.epochs}")
    if args.drop_hopeless:
        overrides.append("stage2.drop_hopeless=true")
    try:
        for assignment in overrides:
            cfg = apply_override(cfg, assignment)
        cfg.validate()
        if args.out:
            out = Path(args.out)
        elif (Path(args.ckpt) / "checkpoints").is_dir():
            target = cfg.stage2.target_macs
            out = Path(args.ckpt) / ("gate-sgs" if target is None else f"gate-t{target:g}")
        else:
            raise UserError(f"pass --out DIR: {args.ckpt} is not a run directory to put the Stage-II run in")
        recal = args.recalibrate == "yes" or (args.recalibrate == "auto" and needs_recalibration(net, meta))
        result = train_gate(net, cfg, out, meta, recalibrate=recal)
    except (ConfigError, CheckpointError) as e:
        raise UserError(str(e)) from e
    if result:
        print(f"Stage II done: {out} (validation split, BN recalibrated for the routes)")
        print(format_gated(result))
    else:
        print(f"Stage II done: {out} (no validation split: data.val_size is 0)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ckpt", metavar="CKPT", help="run directory, checkpoint directory or .safetensors model file"
    )
    p.add_argument(
        "--archs",
        nargs="+",
        default=None,
        metavar="A",
        help="uniform | largest | smallest | routes | x0.5 | archs.json (default: uniform = the config's "
        "eval widths; a gated checkpoint: its gate and routes)",
    )
    p.add_argument(
        "--weights", choices=("model", "ema"), default="model", help="student or EMA-teacher weights"
    )
    p.add_argument("--data-dir", default=None, help="dataset folder, if not where the run found it")


def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a supernet (or static counterparts) from a YAML config")
    p.add_argument("config", metavar="CONFIG", help="YAML preset, e.g. configs/fmnist_quick.yaml")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. optim.lr=0.1 (repeatable)",
    )
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the run directory's latest checkpoint"
    )
    p.set_defaults(func=_train)


def register_recalibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recalibrate", help="recompute BN statistics of a checkpoint for the subnets you will use"
    )
    _common(p)
    p.add_argument(
        "--images", type=int, default=None, help="training images to use (default: the config's recal_images)"
    )
    p.add_argument("--out", default=None, help="output model file (default: next to the checkpoint)")
    p.set_defaults(func=_recalibrate)


def register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1 accuracy and MACs of subnets of a checkpoint")
    _common(p)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument(
        "--recalibrate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="auto: recalibrate unless the file was recalibrated for these subnets",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_eval)


def register_train_gate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-gate", help="Stage II: train the gate of a gated supernet (the backbone stays frozen)"
    )
    p.add_argument(
        "ckpt", metavar="RUN_OR_CKPT", help="gated Stage-I run directory, checkpoint directory or model file"
    )
    p.add_argument(
        "--target-macs",
        type=float,
        default=None,
        metavar="X",
        help="average MACs per image to aim for: a fraction <= 1 of the widest route, or MACs "
        "(default: the config's stage2.target_macs)",
    )
    p.add_argument("--epochs", type=int, default=None, help="Stage-II epochs (default: stage2.epochs)")
    p.add_argument(
        "--drop-hopeless",
        action="store_true",
        help="no gate target for samples even the widest route gets wrong",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. stage2.lr=0.1 (repeatable)",
    )
    p.add_argument("--out", default=None, help="Stage-II run directory (default: RUN/gate-t<target>)")
    p.add_argument(
        "--weights",
        choices=("model", "ema"),
        default="model",
        help="start from the student or EMA-teacher weights",
    )
    p.add_argument(
        "--recalibrate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="BN recalibration for the routes first (auto: unless the file was recalibrated for them)",
    )
    p.set_defaults(func=_train_gate)
