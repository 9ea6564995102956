"""Timing: everything dynaslice measures in seconds lives here (counting MACs and parameters is
:mod:`dynaslice.counting`; served runtimes side by side is :mod:`dynaslice.serve.speed`, built on
:func:`measure_latency` and :func:`paired_ratio` below).

- :func:`measure_latency` times callables interleaved round by round, :func:`paired_ratio` is the
  median of per-round ratios: what every benchmark and the run report time with;
- per-block latency lookup tables, measured on the machine that will run the subnets.


MACs are a poor proxy for latency on real hardware (narrow layers under-use SIMD lanes, fixed
per-layer overheads, memory-bound depthwise convs), so PSS-Net can bucket subnets by *measured*
latency instead. Timing every subnet is impossible (a space holds billions), but a supernet is a
chain of blocks -- stem, ``n_stages`` stages, head (the :class:`~dynaslice.models.base.Supernet`
contract) -- and each block's time depends on few dimensions: its own (``stage_dims(i)``) and
whichever set the width of its input. We find the latter generically: on a meta-device copy
(shapes only, no arithmetic) we shrink one dimension at a time and see which change the shape
entering the block.

Each block is timed over a grid of its dimensions' values. Grids are kept small: each
dimension is subsampled to at most ``max_values`` evenly spread grid values (always including
its smallest and largest), and :meth:`LatencyBlock.predict` interpolates multilinearly between
them (latency is close to piecewise linear in a width at these sizes). ``predict(arch)`` is the
sum of the blocks plus a constant ``overhead_ms`` -- the per-call cost of the full forward
(arch validation, Python dispatch) that the blocks do not see -- calibrated on a few archs
timed end to end.

    dynaslice profile resnet_small --input-size 1 28 28 --latency-table lat.json

builds one (with progress) and reports predicted vs measured end-to-end latency of held-out
random archs. Measured times (blocks and end to end alike) are the *minimum* over ``repeats``
interleaved rounds (:func:`measure_latency`), on CPU with the current
``torch`` thread count: on a shared machine, load only ever adds time, so the minimum is the
stable estimate of what the code itself costs (a median still jumps with bursts of load).
"""

from __future__ import annotations

import itertools
import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import safejson
from .counting import meta_copy
from .models.base import Supernet
from .progress import Progress
from .space import Arch, SearchSpace

FORMAT = "dynaslice-latency-table"
CHUNK = 8  # grid points timed interleaved together (fewer than the slice cache holds)


def measure_latency(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    desc: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Wall-clock seconds of each zero-argument callable, *interleaved* round by round.

    Interleaving means a burst of load on a shared machine hits every candidate alike, so the
    ratios of medians stay meaningful even when absolute times drift.

    When CUDA is in use in this process, the device is synchronised before and after each call:
    CUDA kernels run asynchronously, so without it a call's time would be the time to *launch*
    its work, not to do it.

    ``desc``: show progress under that name (:mod:`dynaslice.progress`; counts calls, warm-up
    included), for measurements that take minutes.

    ``clock``: wall-clock by default; ``time.thread_time`` counts the calling thread's CPU
    seconds only, which a core shared with other busy processes does not inflate by the time
    this thread waits for it (one-thread CPU work only: other threads' work is not counted).
    """
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    bar = Progress(len(fns) * (warmup + repeats), desc or "", unit="call", enabled=desc is not None)
    with bar:
        for fn in fns.values():
            for _ in range(warmup):
                fn()
                bar.update()
        times: dict[str, list[float]] = {k: [] for k in fns}
        with torch.inference_mode():
            for _ in range(repeats):
                for name, fn in fns.items():
                    sync()
                    t0 = clock()
                    fn()
                    sync()
                    times[name].append(clock() - t0)
                    bar.update()
    return times


def paired_ratio(times: Mapping[str, Sequence[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][i] / times[den][i]``.

    Each round measures both candidates back to back, so a load burst on a shared machine
    inflates both terms of the same ratio; the median of these paired ratios is far steadier
    than the ratio of two medians taken over a drifting background.
    """
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def subsample(values: Sequence[int], max_values: int) -> tuple[int, ...]:
    """At most ``max_values`` evenly spread entries of sorted ``values``, ends included."""
    if len(values) <= max_values:
        return tuple(values)
    idx = np.unique(np.rint(np.linspace(0, len(values) - 1, max(max_values, 2))).astype(int))
    return tuple(values[i] for i in idx)


@dataclass
class LatencyBlock:
    """Milliseconds of one block over the grid of the dimensions it depends on."""

    name: str
    dims: tuple[str, ...]
    grid: tuple[tuple[int, ...], ...]
    ms: np.ndarray  # shape: tuple(len(g) for g in grid)

    def points(self) -> list[dict[str, int]]:
        """Every grid point, in ``ms``'s (C) order."""
        return [dict(zip(self.dims, p, strict=True)) for p in itertools.product(*self.grid)]

    def predict(self, arch: Mapping[str, int]) -> float:
        """Multilinear interpolation of the grid at ``arch``'s values (clamped to the grid)."""
        corners: list[list[tuple[int, float]]] = []
        for name, g in zip(self.dims, self.grid, strict=True):
            v = float(arch[name])
            j = int(np.searchsorted(g, v, side="right")) - 1
            j = min(max(j, 0), len(g) - 1)
            if j == len(g) - 1 or g[j] >= v:
                corners.append([(j, 1.0)])
            else:
                w = (v - g[j]) / (g[j + 1] - g[j])
                corners.append([(j, 1.0 - w), (j + 1, w)])
        total = 0.0
        for combo in itertools.product(*corners):
            weight = float(np.prod([w for _, w in combo]))
            total += weight * float(self.ms[tuple(i for i, _ in combo)])
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dims": list(self.dims),
            "grid": [list(g) for g in self.grid],
            "ms": self.ms.reshape(-1).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyBlock:
        grid = tuple(tuple(int(v) for v in g) for g in d["grid"])
        ms = np.array(d["ms"], dtype=np.float64).reshape(tuple(len(g) for g in grid))
        return cls(d["name"], tuple(d["dims"]), grid, ms)


@dataclass
class LatencyTable:
    """Blocks plus a constant overhead: ``predict(arch) = overhead_ms + sum(block.predict(arch))``."""

    blocks: list[LatencyBlock]
    overhead_ms: float = 0.0
    meta: dict[str, Any] | None = None

    def predict(self, arch: Mapping[str, int]) -> float:
        """Predicted milliseconds of one forward of ``arch``."""
        return self.overhead_ms + sum(b.predict(arch) for b in self.blocks)

    def predict_many(self, archs: Sequence[Mapping[str, int]]) -> np.ndarray:
        """Predicted milliseconds of each arch (a resource function for :class:`~dynaslice.train.pss.PSSSampler`)."""
        return np.array([self.predict(a) for a in archs], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": 1,
            **(self.meta or {}),
            "overhead_ms": self.overhead_ms,
            "blocks": [b.to_dict() for b in self.blocks],
        }

    def save(self, path: str | Path) -> None:
        from .atomic import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"latency table {path} not found: build it with dynaslice profile MODEL --latency-table {path}"
            )
        try:
            d = safejson.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{path} is not a dynaslice latency table")
        meta = {k: v for k, v in d.items() if k not in ("format", "version", "overhead_ms", "blocks")}
        try:
            table = cls([LatencyBlock.from_dict(b) for b in d["blocks"]], float(d["overhead_ms"]), meta)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path} is a damaged latency table ({type(e).__name__}: {e}); build it again with "
                "dynaslice profile MODEL --latency-table PATH"
            ) from None
        if not np.isfinite(table.overhead_ms) or not all(np.isfinite(b.ms).all() for b in table.blocks):
            raise ValueError(f"{path} is a damaged latency table (a time is not a finite number); build it again")
        return table


# ---------------------------------------------------------------------------- building


def input_dims(net: Supernet, input_size: Sequence[int]) -> list[tuple[str, ...]]:
    """For each block (stem, stages, head), the dimensions that change the shape entering it."""
    meta = meta_copy(net)
    meta.space = SearchSpace(net.space.dims)  # probe one dimension at a time, ignoring ties
    largest = net.space.largest()
    x = torch.empty(1, *input_size, device="meta")
    out: list[tuple[str, ...]] = [()]  # the stem reads the image
    with torch.no_grad():
        for cut in range(net.n_stages + 1):  # the input of stage `cut` (cut = n_stages: the head)
            base = meta.forward_to(x, largest, cut).shape
            dims = []
            for d in net.space.dims:
                if (
                    len(d.choices) > 1
                    and meta.forward_to(x, largest.replace(**{d.name: d.min}), cut).shape != base
                ):
                    dims.append(d.name)
            out.append(tuple(dims))
    return out


def block_dims(net: Supernet, input_size: Sequence[int]) -> list[tuple[str, tuple[str, ...]]]:
    """``(name, dims)`` of each block: its own dims plus its input's, in space order."""
    ins = input_dims(net, input_size)
    names = ["stem"] + [f"stage{i}" for i in range(net.n_stages)] + ["head"]
    order = {n: i for i, n in enumerate(net.space.names)}
    out = []
    for k, name in enumerate(names):
        i = k - 1  # stage index: -1 stem, n_stages head
        own = net.stage_dims(i)
        dims = sorted(set(own) | set(ins[k]), key=order.__getitem__)
        out.append((name, tuple(d for d in dims if len(net.space[d].choices) > 1)))
    return out


def _block_fn(net: Supernet, k: int) -> Any:
    if k == 0:
        return net.forward_stem
    if k == net.n_stages + 1:
        return net.forward_head
    return partial(net.forward_stage, k - 1)


@torch.no_grad()
def build_latency_table(
    net: Supernet,
    input_size: Sequence[int] | None = None,
    batch_size: int = 1,
    repeats: int = 10,
    max_values: int = 5,
    warmup: int = 2,
    calibration: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> LatencyTable:
    """Time every block of ``net`` over its (subsampled) grid on this machine's CPU.

    ``max_values``: grid values per dimension (the rest are interpolated); ``calibration``
    archs (smallest, largest, then random) are timed end to end to set ``overhead_ms``.
    """
    size = tuple(input_size or net.input_size)
    net.eval()
    param = next(net.parameters())
    largest = net.space.largest()
    meta_net = meta_copy(net)
    x_meta = torch.empty(batch_size, *size, device="meta")
    specs = block_dims(net, size)
    total = sum(
        int(np.prod([len(subsample(net.space[d].choices, max_values)) for d in dims])) for _, dims in specs
    )
    bar = Progress(total, "latency table", unit="point", enabled=progress)
    blocks = []
    for k, (name, dims) in enumerate(specs):
        grid = tuple(subsample(net.space[d].choices, max_values) for d in dims)
        fn = _block_fn(net, k)
        fns = {}
        for j, point in enumerate(itertools.product(*grid)):
            arch = Arch({**largest.to_dict(), **dict(zip(dims, point, strict=True))})
            shape = x_meta.shape if k == 0 else meta_net.forward_to(x_meta, arch, k - 1).shape
            inp = torch.randn(shape, dtype=param.dtype, device=param.device)
            fns[str(j)] = partial(fn, inp, arch)
        # Interleave a few points at a time: sliced layers cache their dense weight slices for
        # at most 16 shapes (dynaslice.nn.base.inference_slices), and deployment runs one arch
        # over and over -- timing dozens of archs round-robin would time cache misses instead.
        times: dict[str, list[float]] = {}
        keys = list(fns)
        for c in range(0, len(keys), CHUNK):
            chunk = keys[c : c + CHUNK]
            times.update(measure_latency({k: fns[k] for k in chunk}, repeats=repeats, warmup=warmup))
            bar.update(len(chunk))
        ms = np.array([1e3 * min(times[str(j)]) for j in range(len(fns))])
        blocks.append(LatencyBlock(name, dims, grid, ms.reshape(tuple(len(g) for g in grid))))
    bar.close()
    table = LatencyTable(blocks, 0.0)
    rng = random.Random(seed)
    calib = [net.space.smallest(), largest] + [net.space.sample(rng) for _ in range(max(0, calibration - 2))]
    desc = "latency table: end to end" if progress else None
    measured = measure_e2e(net, calib, size, batch_size, repeats, warmup, desc=desc)
    table.overhead_ms = float(
        statistics.median(m - table.predict(a) for a, m in zip(calib, measured, strict=True))
    )
    table.meta = {
        "model": type(net).__name__,
        "input_size": list(size),
        "batch_size": batch_size,
        "repeats": repeats,
        "max_values": max_values,
        "device": param.device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    return table


@torch.no_grad()
def measure_e2e(
    net: Supernet,
    archs: Sequence[Arch],
    input_size: Sequence[int],
    batch_size: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    desc: str | None = None,
) -> list[float]:
    """Milliseconds of ``net(x, arch)`` for each arch: the minimum over interleaved rounds
    (``desc``: show progress under that name)."""
    net.eval()
    param = next(net.parameters())
    x = torch.randn(batch_size, *input_size, dtype=param.dtype, device=param.device)
    fns = {str(i): partial(net, x, a) for i, a in enumerate(archs)}
    times: dict[str, list[float]] = {}
    keys = list(fns)
    with Progress(len(keys), desc or "", unit="arch", enabled=desc is not None) as bar:
        for c in range(0, len(keys), CHUNK):  # as for the blocks: stay within the slice cache
            chunk = keys[c : c + CHUNK]
            times.update(measure_latency({k: fns[k] for k in chunk}, repeats=repeats, warmup=warmup))
            bar.update(len(chunk))
    return [1e3 * min(times[str(i)]) for i in range(len(archs))]


def check_table(
    table: LatencyTable,
    net: Supernet,
    n: int = 20,
    seed: int = 1,
    repeats: int = 10,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Predicted vs measured end-to-end latency of ``n`` random archs (held out: not calibrated on)."""
    rng = random.Random(seed + 12345)
    archs = [net.space.sample(rng) for _ in range(n)]
    size = tuple((table.meta or {}).get("input_size") or net.input_size)
    desc = "latency table: held-out check" if progress else None
    measured = measure_e2e(net, archs, size, batch_size, repeats, desc=desc)
    rows = [
        {"arch": a.to_dict(), "predicted_ms": table.predict(a), "measured_ms": m}
        for a, m in zip(archs, measured, strict=True)
    ]
    errs = [abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] * 100 for r in rows]
    return {"archs": rows, "median_abs_pct_error": statistics.median(errs), "max_abs_pct_error": max(errs)}
