"""Side-by-side latency of subnets on every runtime: what ``dynaslice profile``, the run report and
the serving benchmark measure.

All candidates of one batch size are timed *interleaved*, round by round
(:func:`dynaslice.latency.measure_latency`), and ratios are medians of per-round paired ratios
(:func:`dynaslice.latency.paired_ratio`): a burst of load hits both terms of a ratio alike.

- ``speedup``: the largest subnet's time over this one's, in the same runtime and batch size;
- ``efficiency``: ``speedup / (MACs of the largest / MACs of this one)``: 1.0 means every saved
  MAC became saved time (the goal is >= 0.8);
- ``vs_eager``: eager PyTorch's time over this runtime's, same subnet and batch size.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from ..counting import resource_model
from ..latency import measure_latency, paired_ratio
from ..models.base import Supernet
from ..progress import Progress
from ..space import Arch
from ..torch_export import extract_subnet
from .runtimes import Piece, example_input, prepare


def compare_runtimes(
    net: Supernet,
    archs: Mapping[str, Arch],
    runtimes: Sequence[str],
    batch_sizes: Sequence[int] = (1,),
    repeats: int = 20,
    warmup: int = 3,
    input_size: Sequence[int] | None = None,
    largest: str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One row per (runtime, batch size, subnet); see the module docstring for the ratios.

    ``largest``: the name in ``archs`` that speed-ups are relative to (default: the most MACs).
    Every piece is prepared once (:func:`~dynaslice.serve.runtimes.prepare`) before timing.
    ``progress``: show the preparation and the timing as they go (:mod:`dynaslice.progress`;
    minutes for a large model).
    """
    size = tuple(input_size or net.input_size)
    device = next(net.parameters()).device
    net = net.eval()
    rm = resource_model(net, size)
    names = list(archs)
    macs = dict(zip(names, (int(m) for m in rm.macs([archs[n] for n in names])), strict=True))
    params = dict(zip(names, (int(p) for p in rm.params([archs[n] for n in names])), strict=True))
    ref = largest or max(names, key=lambda n: macs[n])
    example = example_input(size, device)
    pieces: dict[tuple[str, str], Piece] = {}
    with Progress(len(runtimes) * len(names), "preparing", unit="model", enabled=progress) as bar:
        for rt in runtimes:
            for n in names:
                pieces[rt, n] = prepare(extract_subnet(net, archs[n], size), example, rt)
                bar.update()
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, *size, device=device)
        fns = {f"{rt}/{n}": partial(piece, x) for (rt, n), piece in pieces.items()}
        desc = f"timing batch {batch}" if progress else None
        times = measure_latency(fns, repeats=repeats, warmup=warmup, desc=desc)
        for rt, n in pieces:
            key = f"{rt}/{n}"
            speedup = paired_ratio(times, f"{rt}/{ref}", key)
            rows.append({
                "runtime": rt, "batch": batch, "name": n, "arch": archs[n].to_dict(), "macs": macs[n],
                "params": params[n], "ms": 1e3 * statistics.median(times[key]),
                "ms_all": [1e3 * t for t in times[key]], "speedup": speedup,
                "efficiency": speedup / (macs[ref] / macs[n]),
                "vs_eager": paired_ratio(times, f"eager/{n}", key) if "eager" in runtimes else None,
            })  # fmt: skip
    return rows


def fastest(rows: Sequence[dict[str, Any]], batch: int) -> str:
    """The runtime with the lowest median time over the subnets, at ``batch``."""
    by_runtime: dict[str, list[float]] = {}
    for r in rows:
        if r["batch"] == batch:
            by_runtime.setdefault(r["runtime"], []).append(r["ms"])
    return min(by_runtime, key=lambda rt: sum(by_runtime[rt]))


def format_speed(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table per batch size: ms, speed-up over the largest and efficiency per runtime.

    Times are per call, i.e. per *batch*: the headers of batches above 1 say so (``ms/batch``).
    """
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == batch]
        runtimes = list(dict.fromkeys(r["runtime"] for r in sel))
        names = list(dict.fromkeys(r["name"] for r in sel))
        cell = {(r["runtime"], r["name"]): r for r in sel}
        unit = "ms" if batch == 1 else "ms/batch"
        head = "| subnet | MMACs | " + " | ".join(f"{rt} {unit} (speed-up, eff.)" for rt in runtimes) + " |"
        title = f"batch {batch}:" if batch == 1 else f"batch {batch} (times per batch of {batch} images):"
        lines = [title, "", head, "| --- | ---: | " + " | ".join("---:" for _ in runtimes) + " |"]
        for n in names:
            cells = [cell[(rt, n)] for rt in runtimes]
            lines.append(
                f"| {n} | {cells[0]['macs'] / 1e6:.2f} | "
                + " | ".join(f"{c['ms']:.3f} ({c['speedup']:.2f}x, {c['efficiency']:.2f})" for c in cells)
                + " |"
            )
        lines.append(f"\nfastest here at batch {batch}: {fastest(rows, batch)}")
        out.append("\n".join(lines))
    return "\n\n".join(out)
