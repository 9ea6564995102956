"""The ``dynaslice`` command line: one module per command group, nothing else imports this package.

- :mod:`.run`: ``run`` (the main job) and ``demo``;
- :mod:`.train`: ``train``, ``train-gate``, ``recalibrate``, ``eval``;
- :mod:`.profile`: ``profile`` (MACs, latency, latency tables);
- :mod:`.select`: ``select`` (a PSS budget table's subnet for a budget);
- :mod:`.export`: ``export`` (a subnet, a budget entry or a gated model as PyTorch/ONNX);
- :mod:`.quantize`: ``quantize`` (int8 post-training quantization of an exported ONNX artifact);
- :mod:`.prune`: ``prune`` (one compact network by DCFF, White-Box, 1xN or a baseline);
- :mod:`.binarize`: ``binarize`` (a binary network by ReCU, SiMaN, the plain BNN);
- :mod:`.common`: what several commands share (``--set``, default run directories, archs, amounts).

The library raises its own exceptions (``ConfigError``, ``CheckpointError``, ``DatasetError``,
``ValueError``, ``OSError``, ...); :func:`main` turns each into one line on stderr and exit code 2,
never a traceback (``DYNASLICE_DEBUG=1`` shows it). Ctrl-C (SIGINT) ends a command with
"interrupted" and exit code 130, SIGTERM (``kill``, a job scheduler) with "terminated" and 143:
128 + the signal, what a shell reports for a process the signal ended. Both unwind the command
like an exception, so half-written files are removed (:mod:`dynaslice.atomic`), the run's lock
is released and ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from ..data import DatasetError, DatasetNotFoundError
from ..runs import RunDirBusy
from ..train import TrainingDiverged
from . import binarize, export, profile, prune, quantize, run, select, train
from .common import UserError

GROUPS = (run, train, profile, select, export, quantize, prune, binarize)  # --help order


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so that the same
    cleanup runs (Python's default for SIGTERM ends the process on the spot, leaving temporaries)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the block (signal handlers belong to the main
    thread: elsewhere nothing changes); the previous handler is back when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return int(e.code or 0)
    try:
        with _sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except (UserError, DatasetError, ValueError, OSError, ImportError, RunDirBusy, TrainingDiverged) as e:
        if os.environ.get("DYNASLICE_DEBUG"):
            raise
        print(f"dynaslice {args.command}: error: {_message(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"dynaslice {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130  # 128 + SIGTERM (15) or SIGINT (2)


__all__ = ["UserError", "build_parser", "main"]
