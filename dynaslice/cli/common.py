"""What several commands share: ``--set``, default run directories, arch and amount parsing,
and reading a model file's config without trusting its paths."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .. import runs
from ..modelfile import load_supernet, resolve_model_file
from ..models.base import Supernet
from ..onnx_export import check_package_target
from ..train.config import Config, from_dict


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


# Amounts on the command line. One reading everywhere: ``12M`` / ``12e6`` is an amount; ``0.5``
# and ``50%`` are a share of the full network, accepted only where a flag says "of the full
# network" (``--target-macs``/``--target-params``: parse_share). Where a share means nothing
# (a PSS budget in MACs, a latency) it is refused with a line saying what the flag wants, never
# read as 0.5 MACs.
MIN_COUNT = 1000
"""Fewer MACs or parameters than any network has: a value below this was meant as a share."""


def _number(text: str, wants: str) -> float:
    """``"12.5M"`` -> 12.5e6 (K, M, G suffixes, any case), positive and finite; else one line: ``wants``."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {wants}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be positive and finite: {wants}")
    return value


def parse_amount(text: str) -> float:
    """An absolute amount (milliseconds, ...): ``"12.5M"`` -> 12.5e6; plain numbers pass through."""
    if text.strip().endswith("%"):
        raise argparse.ArgumentTypeError(f"{text!r}: a percentage means nothing here: give an amount")
    return _number(text, "an amount like 3.5, 12e6 or 12M")


def parse_macs(text: str) -> float:
    """MACs per image (PSS budgets): ``12M``, ``12e6``; a value under :data:`MIN_COUNT` or a
    percentage is refused as a share by mistake (no PSS table knows its full network's MACs)."""
    wants = "MACs per image like 12M or 12e6"
    if text.strip().endswith("%"):
        raise argparse.ArgumentTypeError(f"{text!r}: budgets here are {wants}, not a share of the network")
    value = _number(text, wants)
    if value < MIN_COUNT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is {value:g} MACs, less than any network: did you mean a fraction? "
            f"budgets here are {wants}"
        )
    return value


def parse_share(text: str) -> float:
    """A budget relative to the full network or absolute: ``0.5`` or ``50%`` (half of it, returned
    as 0.5), or an amount like ``12M`` / ``200k`` (returned as is). The library reads a value
    <= 1 as a fraction; a value between 1 and :data:`MIN_COUNT` is neither, and refused."""
    wants = "a fraction <= 1 or a percentage like 50% of the full network, or an amount like 12M"
    body = text.strip()
    if body.endswith("%"):
        value = _number(body[:-1], wants) / 100
        if value > 1:
            raise argparse.ArgumentTypeError(f"{text!r} is more than the full network: give {wants}")
        return value
    value = _number(body, wants)
    if 1 < value < MIN_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction (<= 1) nor a count >= 1k: {wants}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_trust_factory(p: argparse.ArgumentParser) -> None:
    """``--trust-factory NAME``: a model file whose converted net is built by the user's
    ``package.module:factory`` loads only when the user names that factory (a shared file must
    never choose which code dynaslice imports; see :func:`dynaslice.modelfile.build_model`)."""
    p.add_argument(
        "--trust-factory", action="append", default=[], metavar="PKG.MODULE:FACTORY",
        help="import this factory to rebuild the model file's converted network (repeatable; "
        "only factories you trust: importing runs their code)",
    )  # fmt: skip


def load_run_model(
    path: str, weights: str = "model", trust: Collection[str] = ()
) -> tuple[Supernet, dict[str, Any], Config, Path]:
    """``(net, metadata, config, file)`` of a run directory, checkpoint directory or model file
    (``trust``: the ``--trust-factory`` names)."""
    file = resolve_model_file(path)
    net, meta = load_supernet(file, weights, trust)
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
    """Refuse to overwrite ``path`` with a result unless ``force``; name it either way. Also
    fails now, before the work, when the file could not be written (see :func:`check_writable`)."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name for the {what}")
    if path.exists() and not force:
        raise UserError(f"{path} exists: pass --force to overwrite it, or choose another name for the {what}")
    check_writable(path, what)


def refuse_existing_package(path: Path, what: str, force: bool = False) -> None:
    """Refuse to replace the package folder ``path`` unless ``force``; with it, only a folder that
    holds a dynaslice package and nothing else is replaced
    (:func:`dynaslice.onnx_export.check_package_target`: a user's files beside a package would be
    lost). A name ending in ``.onnx`` is refused: a package is a folder. Checked before any work."""
    check_package_target(path)  # a .onnx name, a file, a link, a folder of other things
    if path.is_dir() and set(os.listdir(path)) - {runs.LOCK} and not force:
        raise UserError(f"{path} holds a package: pass --force to replace it, or choose another {what} name")
    check_writable(path, what)


def check_writable(path: Path, what: str) -> None:
    """Refuse an output ``path`` whose folder cannot be created or written, before any work is
    done: its nearest existing ancestor must be a writable directory."""
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise UserError(f"cannot write the {what} to {path}: {where} is a file, not a directory")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the {what} to {path}: {where} is not writable")


def run_dir_arg(out: Path) -> Path:
    """A run directory given with ``--out``: a writable directory or a new name in a writable place.

    An existing directory needs only itself writable (a run writes inside it, never next to it:
    a writable run in a read-only parent, e.g. a shared results folder, is fine); a new one needs
    its nearest existing ancestor writable (:func:`check_writable`).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the run (new or existing)")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"--out {out} is not writable; choose another directory for the run")
        return out
    check_writable(out, "run")
    return out


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
