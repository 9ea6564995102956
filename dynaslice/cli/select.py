"""``dynaslice select RUN --max-macs X``: the most accurate subnet of a PSS budget table within a budget."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..budget import BudgetNet, BudgetTable
from .common import UserError, budget_source, parse_amount, parse_macs, refuse_existing
from .export import write_subnet


def _select(args: argparse.Namespace) -> int:
    if args.max_macs is None and args.max_latency_ms is None:
        raise UserError("give a budget: --max-macs X and/or --max-latency-ms X")
    if args.export:
        refuse_existing(Path(args.export), "exported subnet", force=True)
    source = budget_source(Path(args.run))
    table = BudgetTable.load(source)
    entry = table.best_entry(args.max_macs, args.max_latency_ms)
    line = f"bucket {table.bucket_label(entry)}: {entry.macs / 1e6:.2f} MMACs"
    if entry.latency_ms is not None:
        line += f", {entry.latency_ms:.3f} ms"
    print(f"{line}, val top-1 {entry.val_accuracy:.2f}%")
    print(entry.arch.to_json())
    if args.export:
        out = Path(args.export)
        budget_net = BudgetNet.load(source).eval()
        write_subnet(budget_net.net, budget_net.use(entry), out, "onnx" if out.suffix == ".onnx" else "torch")
        print(f"exported the subnet to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="pick the most accurate subnet of a PSS run's budget table within a budget",
        description="Print the most accurate subnet of a PSS run's budget table (chosen on the validation "
        "split) whose MACs / predicted latency fit the budget; optionally export it.",
    )
    p.add_argument("run", metavar="RUN_OR_CKPT", help="PSS run directory, checkpoint dir, budget_table.json or budget.safetensors")
    p.add_argument(
        "--max-macs", type=parse_macs, default=None, metavar="X",
        help="MACs per image, e.g. 12M or 12e6 (not a share of the network: a value under 1k is refused)",
    )  # fmt: skip
    p.add_argument("--max-latency-ms", type=parse_amount, default=None, metavar="X", help="predicted milliseconds")
    p.add_argument("--export", default=None, metavar="PATH", help="write the subnet: PATH.onnx as ONNX, else torch.save of the static model")
    p.set_defaults(func=_select)
