"""``dynaslice profile MODEL``: MACs, parameters and measured CPU latency of a supernet's subnets.

The point of dynamic weight slicing is that a narrower subnet is *really* faster, not only
smaller on paper. So next to the exact MACs and parameter counts, each subnet is timed twice:
sliced inside the supernet (what dynamic inference runs) and as its extracted static model (what
you deploy). All of them are timed interleaved, round by round
(:func:`dynaslice.profile.measure_latency`), so a burst of load on a shared machine hits every
candidate alike and the ratios stay meaningful.

    dynaslice profile vit_small_input --input-size 1 28 28 --json profile.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_json
from ..export import extract_subnet
from ..latency import build_latency_table, check_table
from ..models import Supernet, create_supernet
from ..profile import measure_latency, paired_ratio, resource_model
from ..space import Arch
from .common import UserError, positive_int, refuse_existing

RATIOS = (0.35, 0.5, 0.75)


def named_archs(net: Supernet) -> list[tuple[str, Arch]]:
    """The profiled subnets: smallest, uniform 0.35 / 0.5 / 0.75 of every width, largest."""
    space = net.space
    return [
        ("smallest", space.smallest()),
        *((f"uniform {r}", space.uniform(r)) for r in RATIOS),
        ("largest", space.largest()),
    ]


def profile_supernet(
    net: Supernet,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 1,
    repeats: int = 20,
    latency: bool = True,
) -> list[dict[str, Any]]:
    """One row per profiled subnet: name, arch, MACs per image, parameters and, if ``latency``,
    median CPU milliseconds per batch sliced and static (plus every measured time), and the
    static speed-up over the largest subnet as the median of per-round paired ratios."""
    size = tuple(input_size or net.input_size)
    net = net.eval()
    archs = named_archs(net)
    rm = resource_model(net, size)
    macs, params = rm.macs([a for _, a in archs]), rm.params([a for _, a in archs])
    rows: list[dict[str, Any]] = [
        {"name": name, "arch": arch.to_dict(), "macs": int(m), "params": int(p)}
        for (name, arch), m, p in zip(archs, macs, params, strict=True)
    ]
    if not latency:
        return rows
    param = next(net.parameters())
    x = torch.randn(batch_size, *size, dtype=param.dtype, device=param.device)
    fns = {}
    for name, arch in archs:
        fns[f"{name}/static"] = partial(extract_subnet(net, arch, size).eval(), x)
        fns[f"{name}/sliced"] = partial(net, x, arch)
    with torch.inference_mode():
        times = measure_latency(fns, repeats=repeats)
    for row in rows:
        for kind in ("static", "sliced"):
            ms = [1e3 * t for t in times[f"{row['name']}/{kind}"]]
            row[f"{kind}_ms"] = statistics.median(ms)
            row[f"{kind}_ms_all"] = ms
        row["speedup"] = paired_ratio(times, "largest/static", f"{row['name']}/static")
    return rows


def format_profile(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table; speed-up: the largest static subnet's time over this
    one's, median of per-round paired ratios."""
    timed = "static_ms" in rows[0]
    head = f"{'subnet':<14}{'MMACs':>10}{'params(M)':>11}"
    if timed:
        head += f"{'static ms':>11}{'sliced ms':>11}{'speed-up':>10}"
    lines = [head]
    for r in rows:
        line = f"{r['name']:<14}{r['macs'] / 1e6:>10.2f}{r['params'] / 1e6:>11.3f}"
        if timed:
            line += f"{r['static_ms']:>11.3f}{r['sliced_ms']:>11.3f}{r['speedup']:>9.2f}x"
        lines.append(line)
    return "\n".join(lines)


def profile(args: argparse.Namespace) -> int:
    if args.json:
        refuse_existing(Path(args.json), "JSON results", force=True)
    kwargs: dict[str, Any] = {}
    if args.num_classes is not None:
        if args.num_classes < 1:
            raise UserError("--num-classes must be at least 1")
        kwargs["num_classes"] = args.num_classes
    if args.input_size is not None:
        c, h, w = args.input_size
        if min(c, h, w) < 1:
            raise UserError(f"--input-size must be three positive integers C H W, got {c} {h} {w}")
        kwargs["in_chans"] = c
        if h == w:  # builders take one side; a ViT sizes its position table from it
            kwargs["input_size"] = h
    net = create_supernet(args.model, **kwargs)
    size = tuple(args.input_size) if args.input_size else net.input_size
    if args.latency_table:
        if args.grid_values < 2:
            raise UserError("--grid-values must be at least 2")
        return latency_table(net, args.model, size, args)
    rows = profile_supernet(net, size, args.batch_size, args.repeats, latency=not args.no_latency)

    c, h, w = size
    print(
        f"{args.model}: input {c}x{h}x{w}, batch {args.batch_size}, {len(net.space)} subnets"
        + ("" if args.no_latency else f", CPU threads {torch.get_num_threads()}, median of {args.repeats}")
    )
    print(format_profile(rows))
    if args.json:
        atomic_write_json(
            Path(args.json),
            {
                "model": args.model,
                "input_size": list(size),
                "num_classes": net.num_classes,
                "batch_size": args.batch_size,
                "repeats": None if args.no_latency else args.repeats,
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "subnets": rows,
            },
        )
        print(f"wrote {args.json}")
    return 0


def latency_table(net: Supernet, model: str, size: tuple[int, int, int], args: argparse.Namespace) -> int:
    """``--latency-table PATH``: build a per-block table on this machine, save it, check it on held-out archs."""
    table = build_latency_table(net, size, args.batch_size, args.repeats, args.grid_values, seed=0)
    table.meta = {**(table.meta or {}), "model": model}
    check = check_table(table, net, args.check, repeats=args.repeats, batch_size=args.batch_size)
    table.meta["check"] = {k: v for k, v in check.items() if k != "archs"}
    table.save(args.latency_table)
    points = sum(b.ms.size for b in table.blocks)
    print(
        f"{model}: latency table of {len(table.blocks)} blocks, {points} grid points "
        f"(<= {args.grid_values} values per dimension, interpolated), overhead {table.overhead_ms:.3f} ms, "
        f"batch {args.batch_size}, {torch.get_num_threads()} thread(s)"
    )
    for b in table.blocks:
        print(f"  {b.name:<8} dims {', '.join(b.dims) or '-':<28} {b.ms.min():.3f} .. {b.ms.max():.3f} ms")
    print(f"held-out check on {args.check} random archs: predicted vs measured end to end")
    for r in check["archs"][:5]:
        print(f"  predicted {r['predicted_ms']:.3f} ms, measured {r['measured_ms']:.3f} ms")
    print(
        f"median abs error {check['median_abs_pct_error']:.1f}% (max {check['max_abs_pct_error']:.1f}%); "
        f"wrote {args.latency_table}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="MACs, parameters and CPU latency of a supernet's subnets",
        description="Profile the smallest, uniform 0.35/0.5/0.75 and largest subnets of MODEL: exact MACs "
        "and parameters, and CPU latency both sliced in the supernet and as the extracted static model.",
    )
    p.add_argument("model", metavar="MODEL", help="a registered supernet, e.g. resnet50, vit_small_input")
    p.add_argument(
        "--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="input shape (default: the model's)"
    )
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per timed forward (default: 1)")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed rounds per subnet (default: 20)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--no-latency", action="store_true", help="only count MACs and parameters")
    p.add_argument(
        "--latency-table",
        metavar="PATH",
        help="instead: build a per-block latency lookup table on this machine, write it to PATH (JSON) "
        "and check predicted vs measured latency of held-out random subnets",
    )
    p.add_argument(
        "--grid-values", type=int, default=5, help="latency table: timed values per dimension (default 5)"
    )
    p.add_argument(
        "--check", type=positive_int, default=20, help="latency table: held-out random subnets to check (default 20)"
    )
    p.set_defaults(func=profile)
