"""The ``dynaslice`` command line.

Each subcommand lives next to the code it drives and registers itself through a
``register(subparsers)`` function listed in ``COMMANDS``; ``main`` only dispatches. Errors meant
for people (bad paths, configs, archs, checkpoints) are raised as :class:`UserError` and end
with one line on stderr and exit code 2, never a traceback (set ``DYNASLICE_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


# "module:function" of each subcommand's register(subparsers) function, in --help order.
COMMANDS: list[str] = [
    "dynaslice.pipeline:register",
    "dynaslice.commands:register_demo",
    "dynaslice.train.commands:register_train",
    "dynaslice.train.commands:register_train_gate",
    "dynaslice.train.commands:register_recalibrate",
    "dynaslice.train.commands:register_eval",
    "dynaslice.profile_cli:register",
    "dynaslice.budget:register",
    "dynaslice.export_cli:register",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynaslice", description="Dynamic weight slicing: train, gate, select, export supernets."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for spec in COMMANDS:
        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .data import DatasetError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, DatasetError, FileNotFoundError, ValueError) as e:
        if os.environ.get("DYNASLICE_DEBUG"):
            raise
        print(f"dynaslice {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynaslice {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m dynaslice.cli` runs this file as __main__; dispatch through the imported module
    # so that exception classes (UserError, ...) are the ones the commands raise.
    from dynaslice.cli import main as _main

    sys.exit(_main())
