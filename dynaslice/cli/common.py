"""What several commands share: ``--set``, default run directories, arch and amount parsing,
and reading a model file's config without trusting its paths."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from .. import runs
from ..gate import GatedSupernet
from ..modelfile import load_supernet, resolve_model_file
from ..models.base import Supernet
from ..space import Arch
from ..train.config import Config, from_dict
from ..train.evaluate import uniform_archs


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def add_set(p: argparse.ArgumentParser, example: str = "optim.lr=0.1") -> None:
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config value, e.g. {example} (repeatable)",
    )  # fmt: skip


def default_run_dir(config: str) -> Path:
    """``runs/<config name>``: where a config's run goes unless ``--out`` says otherwise."""
    return Path("runs") / Path(config).stem


def parse_amount(text: str) -> float:
    """``"12.5M"`` -> 12.5e6; plain numbers pass through; K, M, G suffixes (any case)."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number like 12e6 or 12M") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite amount")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def parse_archs(tokens: list[str], net: Supernet, default_widths: list[float]) -> dict[str, Arch]:
    """``uniform`` (the config's eval widths), ``largest``, ``smallest``, ``routes`` (a gated
    net's routes), a ratio like ``x0.5`` or ``0.5``, or a JSON file holding a list of archs or a
    ``{name: arch}`` mapping."""
    archs: dict[str, Arch] = {}
    for token in tokens:
        if token == "routes":
            if not isinstance(net, GatedSupernet):
                raise UserError("--archs routes needs a gated checkpoint (trained with model.gate.enabled=true)")
            archs.update(net.named_routes())
        elif token == "uniform":
            archs.update(uniform_archs(net, default_widths))
        elif token in ("largest", "smallest"):
            archs[token] = getattr(net.space, token)()
        elif token.endswith(".json"):
            archs.update(_archs_from_json(token, net))
        else:
            archs.update(uniform_archs(net, [_ratio(token, net)]))
    return archs


def _archs_from_json(token: str, net: Supernet) -> dict[str, Arch]:
    try:
        data = json.loads(Path(token).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read archs from {token}: {e}") from None
    if not isinstance(data, dict | list):
        raise UserError(f"{token} must hold a list of archs or a {{name: arch}} mapping")
    items = data.items() if isinstance(data, dict) else ((f"arch{i}", a) for i, a in enumerate(data))
    return {str(name): net.space.validate(a) for name, a in items}


def _ratio(token: str, net: Supernet) -> float:
    try:
        return float(token.removeprefix("x"))
    except ValueError:
        raise UserError(
            f"--archs {token!r}: use uniform, largest, smallest, a width ratio like x0.5, or a .json file"
        ) from None


def parse_arch(token: str, net: Supernet) -> Arch:
    """One arch: ``largest``, ``smallest``, ``x0.5``, ``routeN``, inline JSON or a JSON file."""
    text = token.strip()
    if text.startswith("{"):
        try:
            return net.space.validate(json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"--arch {token!r} is not valid JSON: {e}") from None
    if text.startswith("route") and text[5:].isdigit():
        if not isinstance(net, GatedSupernet):
            raise UserError(f"--arch {token}: routes belong to gated checkpoints; this one is not gated")
        r = int(text[5:])
        if r >= len(net.routes):
            raise UserError(f"--arch {token}: the gate has {len(net.routes)} routes (route0..route{len(net.routes) - 1})")
        return net.routes[r]
    if text.endswith(".json"):
        try:
            data = json.loads(Path(text).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read an arch from {text}: {e}") from None
        if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
            return net.space.validate(data)
    archs = parse_archs([text], net, [])
    if len(archs) != 1:
        raise UserError(f"--arch {token!r} names {len(archs)} subnets; give exactly one")
    return next(iter(archs.values()))


def load_checkpoint(path: str, weights: str = "model") -> tuple[Supernet, dict[str, Any], Config, Path]:
    """``(net, metadata, config, file)`` of a run directory, checkpoint directory or model file."""
    file = resolve_model_file(path)
    net, meta = load_supernet(file, weights)
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"{file} carries no training config; evaluate it from Python instead")
    return net, meta, from_dict(meta["config"]), file


def trusted_data(cfg: Config, data_dir: str | None) -> Config:
    """``cfg`` with the dataset read from ``data_dir`` or the dataset's default place.

    A model file's config may name any ``data.root``; reading the data from there would let a
    shared file decide which files on this machine get parsed. So the file only names the
    dataset; where it lives is the user's word (``--data-dir``) or the default.
    """
    if cfg.data.name == "folder" and data_dir is None:
        raise UserError(f"this model was trained on an image folder: pass --data-dir DIR (it had {cfg.data.root})")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=data_dir))


def refuse_existing(path: Path, what: str, force: bool = False) -> None:
    """Refuse to overwrite ``path`` with a result unless ``force``; name it either way."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name for the {what}")
    if path.exists() and not force:
        raise UserError(f"{path} exists: pass --force to overwrite it, or choose another name for the {what}")


def budget_source(path: Path) -> Path:
    """The PSS run directory (or budget file) behind ``path``: a run, a checkpoint of it, a table or weights file."""
    if not path.exists():
        raise UserError(f"{path} not found: pass a PSS run directory or its {runs.BUDGET_WEIGHTS}")
    if path.is_file():
        return path.parent if path.name == runs.BUDGET_TABLE else path
    for d in (path, path.parent, path.parent.parent):  # a run, checkpoints/, checkpoints/step-N
        if (d / runs.BUDGET_TABLE).is_file() or (d / runs.BUDGET_WEIGHTS).is_file():
            return d
    raise UserError(
        f"{path} has no PSS budget table ({runs.BUDGET_TABLE}): it is written at the end of a run with "
        "train.sampler: pss; use --arch for other checkpoints"
    )
