"""The ``dynaslice`` command line: one module per command group, nothing else imports this package.

- :mod:`.run`: ``run`` (the main job) and ``demo``;
- :mod:`.train`: ``train``, ``train-gate``, ``recalibrate``, ``eval``;
- :mod:`.profile`: ``profile`` (MACs, latency, latency tables);
- :mod:`.select`: ``select`` (a PSS budget table's subnet for a budget);
- :mod:`.export`: ``export`` (a subnet, a budget entry or a gated model as PyTorch/ONNX);
- :mod:`.quantize`: ``quantize`` (int8 post-training quantization of an exported ONNX artifact);
- :mod:`.prune`: ``prune`` (one compact network by DCFF, White-Box, 1xN or a baseline);
- :mod:`.common`: what several commands share (``--set``, default run directories, archs, amounts).

The library raises its own exceptions (``ConfigError``, ``CheckpointError``, ``DatasetError``,
``ValueError``, ``OSError``, ...); :func:`main` turns each into one line on stderr and exit code 2,
never a traceback (``DYNASLICE_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..data import DatasetError, DatasetNotFoundError
from ..runs import RunDirBusy
from ..train import TrainingDiverged
from . import export, profile, prune, quantize, run, select, train
from .common import UserError

GROUPS = (run, train, profile, select, export, quantize, prune)  # --help order


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dynaslice", description="Dynamic weight slicing: train, gate, select, export supernets."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def _message(e: BaseException, args: argparse.Namespace) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, DatasetNotFoundError):  # how to name another folder depends on the command
        text += "; name a folder with " + ("--data-dir DIR" if hasattr(args, "data_dir") else "--set data.root=DIR")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except (UserError, DatasetError, ValueError, OSError, ImportError, RunDirBusy, TrainingDiverged) as e:
        if os.environ.get("DYNASLICE_DEBUG"):
            raise
        print(f"dynaslice {args.command}: error: {_message(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynaslice {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["UserError", "build_parser", "main"]
