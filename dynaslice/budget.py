"""Budget tables: the deployable subnet for each resource budget of a PSS-Net supernet.

A PSS run (``train.sampler=pss``, see :mod:`dynaslice.train.pss`) ends by picking, for every
budget bucket, the subnet of its pool with the best accuracy on the *validation* split, and
writes ``RUN/budget_table.json`` (bucket -> arch, MACs, validation accuracy, predicted latency
when a latency table was given) and ``RUN/budget.safetensors`` (the weights, BatchNorm
statistics recalibrated for exactly the table's subnets).

Switching budget at run time is one call that reloads nothing -- the supernet holds every
subnet, the table only names which one to run::

    from dynaslice.budget import BudgetTable
    from dynaslice.train import load_supernet

    net, _ = load_supernet("runs/pss/budget.safetensors"); net.eval()
    table = BudgetTable.load("runs/pss")
    y = net(x, table.best(max_macs=10e6))          # resources shrink: a smaller subnet, same net
    y = net(x, table.best(max_latency_ms=2.0))     # with a latency table (train.pss.latency_table)

From the shell: ``dynaslice select runs/pss --max-macs 10M [--export subnet.pt|subnet.onnx]``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .space import Arch

TABLE_FILE, WEIGHTS_FILE = "budget_table.json", "budget.safetensors"


@dataclass(frozen=True)
class BudgetEntry:
    """One bucket's deployable subnet. ``val_accuracy``: top-1 (%) on the validation split with
    the table's shared BN statistics; ``val_accuracy_alone``: with BN recalibrated for it alone
    (what it was selected on, among ``candidates`` subnets)."""

    bucket: float
    arch: Arch
    macs: int
    val_accuracy: float
    val_accuracy_alone: float | None = None
    candidates: int = 1
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "arch": self.arch.to_dict(),
            "macs": self.macs,
            "val_accuracy": self.val_accuracy,
            "val_accuracy_alone": self.val_accuracy_alone,
            "candidates": self.candidates,
            "latency_ms": self.latency_ms,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetEntry:
        return cls(
            bucket=float(d["bucket"]),
            arch=Arch(d["arch"]),
            macs=int(d["macs"]),
            val_accuracy=float(d["val_accuracy"]),
            val_accuracy_alone=d.get("val_accuracy_alone"),
            candidates=int(d.get("candidates", 1)),
            latency_ms=d.get("latency_ms"),
        )


@dataclass
class BudgetTable:
    """Budget bucket -> subnet. :meth:`best` answers "which subnet for this budget?"."""

    entries: list[BudgetEntry]
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries

    def best(self, max_macs: float | None = None, max_latency_ms: float | None = None) -> Arch:
        """The most accurate subnet within the budget (all given limits must hold).

        Raises a ValueError naming the cheapest entry when none fits.
        """
        return self.best_entry(max_macs, max_latency_ms).arch

    def best_entry(self, max_macs: float | None = None, max_latency_ms: float | None = None) -> BudgetEntry:
        if not self.entries:
            raise ValueError("the budget table is empty")
        if max_latency_ms is not None and any(e.latency_ms is None for e in self.entries):
            raise ValueError(
                "this budget table has no latencies: train with train.pss.latency_table set, or use max_macs"
            )
        fits = [
            e
            for e in self.entries
            if (max_macs is None or e.macs <= max_macs)
            and (max_latency_ms is None or e.latency_ms <= max_latency_ms)  # type: ignore[operator]
        ]
        if not fits:
            cheapest = min(self.entries, key=lambda e: e.macs)
            need = f"{cheapest.macs / 1e6:.3g} MMACs"
            if cheapest.latency_ms is not None:
                need += f", {cheapest.latency_ms:.3g} ms"
            asked = ", ".join(
                f"{k}={v:g}"
                for k, v in (("max_macs", max_macs), ("max_latency_ms", max_latency_ms))
                if v is not None
            )
            raise ValueError(f"no subnet of the budget table fits {asked}; the cheapest needs {need}")
        # most accurate; on a tie the cheaper one
        return max(fits, key=lambda e: (e.val_accuracy, -e.macs))

    def format(self) -> str:
        """A Markdown table."""
        lat = any(e.latency_ms is not None for e in self.entries)
        lines = ["| bucket | MMACs | " + ("ms | " if lat else "") + "val top-1 (%) | arch |"]
        lines.append("| ---: | ---: | " + ("---: | " if lat else "") + "---: | --- |")
        for e in self.entries:
            ms = f"{e.latency_ms:.3f} | " if lat and e.latency_ms is not None else ("- | " if lat else "")
            arch = " ".join(f"{k}={v}" for k, v in e.arch.items())
            lines.append(f"| {e.bucket:g} | {e.macs / 1e6:.2f} | {ms}{e.val_accuracy:.2f} | {arch} |")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "dynaslice-budget-table",
            "version": 1,
            **self.meta,
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetTable:
        if not isinstance(d, dict) or "entries" not in d:
            raise ValueError("not a budget table (no 'entries')")
        meta = {k: v for k, v in d.items() if k not in ("format", "version", "entries")}
        return cls([BudgetEntry.from_dict(e) for e in d["entries"]], meta)

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (a temporary file in the same folder, then a rename)."""
        atomic_write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> BudgetTable:
        """From a table JSON, a run directory, or a ``budget.safetensors`` model file."""
        path = Path(path)
        if path.is_dir():
            path = path / TABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no budget table at {path}: it is written at the end of a run with train.sampler=pss"
            )
        if path.suffix == ".safetensors":
            from .train.checkpoint import load_model_file

            _, meta = load_model_file(path)
            if "budget_table" not in meta:
                raise ValueError(f"{path} holds no budget table (use the run's {WEIGHTS_FILE})")
            return cls.from_dict(meta["budget_table"])
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------- CLI


def parse_amount(text: str) -> float:
    """``"12.5M"`` -> 12.5e6; plain numbers pass through; K, M, G suffixes (any case)."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number like 12e6 or 12M") from None


def _select(args: argparse.Namespace) -> int:
    from .cli import UserError

    if args.max_macs is None and args.max_latency_ms is None:
        raise UserError("give a budget: --max-macs X and/or --max-latency-ms X")
    run = Path(args.run)
    if not run.exists():
        raise UserError(f"{run} not found: pass a PSS run directory or its {WEIGHTS_FILE}")
    if run.is_dir() and not (run / TABLE_FILE).is_file() and (run / WEIGHTS_FILE).is_file():
        run = run / WEIGHTS_FILE
    if run.is_dir() and not (run / TABLE_FILE).is_file() and run.parent.name == "checkpoints":
        run = run.parent.parent  # a checkpoint directory: its run directory holds the table
    try:
        table = BudgetTable.load(run)
        entry = table.best_entry(args.max_macs, args.max_latency_ms)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    line = f"bucket {entry.bucket:g}: {entry.macs / 1e6:.2f} MMACs"
    if entry.latency_ms is not None:
        line += f", {entry.latency_ms:.3f} ms"
    print(f"{line}, val top-1 {entry.val_accuracy:.2f}%")
    print(entry.arch.to_json())
    if args.export:
        _export(run, entry.arch, Path(args.export))
    return 0


def _export(run: Path, arch: Arch, out: Path) -> None:
    import torch

    from .cli import UserError
    from .export import extract_subnet
    from .train.checkpoint import CheckpointError, load_supernet

    if run.suffix == ".safetensors":
        weights = run
    else:
        weights = (run.parent if run.is_file() else run) / WEIGHTS_FILE
    try:
        net, _ = load_supernet(weights if weights.is_file() else run)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    net.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".onnx":
        try:
            from .onnx_export import export_onnx
        except ImportError as e:
            raise UserError(f"ONNX export is unavailable ({e}); export to a .pt file instead") from None
        export_onnx(net, arch, out)
    else:
        torch.save(extract_subnet(net, arch), out)
    print(f"exported the subnet to {out}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="pick the most accurate subnet of a PSS run's budget table within a budget",
        description="Print the most accurate subnet of a PSS run's budget table (chosen on the validation "
        "split) whose MACs / predicted latency fit the budget; optionally export it.",
    )
    p.add_argument(
        "run",
        metavar="RUN_OR_CKPT",
        help="PSS run directory, checkpoint dir, budget_table.json or budget.safetensors",
    )
    p.add_argument(
        "--max-macs", type=parse_amount, default=None, metavar="X", help="MACs per image, e.g. 12e6 or 12M"
    )
    p.add_argument("--max-latency-ms", type=float, default=None, metavar="X", help="predicted milliseconds")
    p.add_argument(
        "--export",
        default=None,
        metavar="PATH",
        help="write the subnet: PATH.onnx as ONNX, else torch.save of the static model",
    )
    p.set_defaults(func=_select)
