"""``dynaslice profile MODEL``: MACs, parameters and measured latency of a supernet's subnets on
every runtime available here.

The point of dynamic weight slicing is that a narrower subnet is *really* faster, not only
smaller on paper. So next to the exact MACs and parameter counts, each subnet is timed as its
extracted static model on each runtime (eager PyTorch, frozen TorchScript, onnxruntime, ...) at
each batch size, all interleaved round by round (:mod:`dynaslice.serve.speed`): the table shows
milliseconds, the speed-up over the largest subnet (median of paired ratios) and the efficiency
(speed-up / MAC reduction), and names the fastest runtime here.

    dynaslice profile resnet_small --input-size 1 28 28 --batch-sizes 1 64 --json profile.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_json
from ..counting import resource_model
from ..latency import build_latency_table, check_table
from ..models import Supernet, create_supernet
from ..serve import available_runtimes, resolve_runtime
from ..serve.speed import compare_runtimes, fastest, format_speed
from ..space import Arch
from .common import UserError, positive_int, refuse_existing

RATIOS = (0.35, 0.5, 0.75)


def named_archs(net: Supernet) -> dict[str, Arch]:
    """The profiled subnets: smallest, uniform 0.35 / 0.5 / 0.75 of every width, largest.

    Names of the same network share one row (``smallest = uniform 0.35`` in most CNNs): timed as
    two rows, one network showed two speed-ups (1.60x and 2.00x for resnet50 on a busy machine),
    which is noise between two timings, not a difference.
    """
    space = net.space
    candidates = [("smallest", space.smallest()), *((f"uniform {r}", space.uniform(r)) for r in RATIOS),
                  ("largest", space.largest())]  # fmt: skip
    names: dict[Arch, list[str]] = {}
    for name, arch in candidates:
        names.setdefault(arch, []).append(name)
    return {" = ".join(n): arch for arch, n in names.items()}


def _runtimes(text: str, device: str) -> list[str]:
    """``--runtimes``: ``default`` (every available one but compile, whose first call per shape
    takes minutes on CPU), ``all``, or a comma-separated list; eager always comes first."""
    have = available_runtimes(device)
    if text in ("default", "all"):
        chosen = [r for r in have if text == "all" or r != "compile"]
    else:
        chosen = [resolve_runtime(r.strip(), device) for r in text.split(",") if r.strip()]
    return ["eager"] + [r for r in dict.fromkeys(chosen) if r != "eager"]


def _build(args: argparse.Namespace) -> tuple[Supernet, tuple[int, int, int]]:
    kwargs: dict[str, Any] = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.input_size is not None:
        c, h, w = args.input_size
        if min(c, h, w) < 1:
            raise UserError(f"--input-size must be three positive integers C H W, got {c} {h} {w}")
        kwargs["in_chans"] = c
        if h == w:  # builders take one side; a ViT sizes its position table from it
            kwargs["input_size"] = h
    net = create_supernet(args.model, **kwargs)
    return net, tuple(args.input_size) if args.input_size else net.input_size


def profile(args: argparse.Namespace) -> int:
    if args.json:
        refuse_existing(Path(args.json), "JSON results", force=True)
    net, size = _build(args)
    if args.latency_table:
        if args.grid_values < 2:
            raise UserError("--grid-values must be at least 2")
        return latency_table(net, args.model, size, args)
    archs = named_archs(net)
    rm = resource_model(net, size)
    counts = [{"name": n, "arch": a.to_dict(), "macs": int(m), "params": int(p)} for (n, a), m, p in
              zip(archs.items(), rm.macs(list(archs.values())), rm.params(list(archs.values())), strict=True)]  # fmt: skip
    c, h, w = size
    print(f"{args.model}: input {c}x{h}x{w}, {len(net.space)} subnets, {torch.get_num_threads()} thread(s)")
    for r in counts:
        print(f"  {r['name']:<14}{r['macs'] / 1e6:>10.2f} MMACs{r['params'] / 1e6:>9.3f} M params")
    rows: list[dict[str, Any]] = []
    if not args.no_latency:
        runtimes = _runtimes(args.runtimes, "cpu")
        batches = ", ".join(map(str, args.batch_sizes))
        print(f"timing {len(archs)} subnets on {', '.join(runtimes)} at batch {batches}", flush=True)
        rows = compare_runtimes(
            net, archs, runtimes, args.batch_sizes, args.repeats, input_size=size, progress=True
        )
        print(f"latency, median of {args.repeats} interleaved rounds:\n{format_speed(rows)}")
    if args.json:
        atomic_write_json(Path(args.json), {
            "model": args.model, "input_size": list(size), "num_classes": net.num_classes,
            "batch_sizes": args.batch_sizes, "repeats": None if args.no_latency else args.repeats,
            "latency_unit": "ms per call = per batch of `batch` images (median of rounds; ms_all: each round)",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "subnets": counts, "latency": rows,
            "fastest": {str(b): fastest(rows, b) for b in args.batch_sizes} if rows else {},
        })  # fmt: skip
        print(f"wrote {args.json}")
    return 0


def latency_table(net: Supernet, model: str, size: tuple[int, int, int], args: argparse.Namespace) -> int:
    """``--latency-table PATH``: build a per-block table on this machine, save it, check it on held-out archs."""
    table = build_latency_table(net, size, args.batch_sizes[0], args.repeats, args.grid_values, seed=0)
    table.meta = {**(table.meta or {}), "model": model}
    check = check_table(table, net, args.check, repeats=args.repeats, batch_size=args.batch_sizes[0])
    table.meta["check"] = {k: v for k, v in check.items() if k != "archs"}
    table.save(args.latency_table)
    points = sum(b.ms.size for b in table.blocks)
    print(
        f"{model}: latency table of {len(table.blocks)} blocks, {points} grid points "
        f"(<= {args.grid_values} values per dimension, interpolated), overhead {table.overhead_ms:.3f} ms, "
        f"batch {args.batch_sizes[0]}, {torch.get_num_threads()} thread(s)"
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
    p.add_argument(
        "model", metavar="MODEL",
        help="a registered supernet, e.g. resnet50, vit_small_input, or one to convert: torchvision:resnet18",
    )  # fmt: skip
    p.add_argument(
        "--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="input shape (default: the model's)"
    )
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier outputs (default: the model's)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 64], metavar="B",
                   help="images per timed forward (default: 1 64)")  # fmt: skip
    p.add_argument(
        "--runtimes", default="default", metavar="R",
        help="default (every runtime available here but compile), all, or a list like eager,onnxruntime",
    )  # fmt: skip
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
