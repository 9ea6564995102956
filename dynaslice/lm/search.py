"""Mix'n'Match search on measured latency: per-layer FFN widths, heads and depth (issue 32, item 3).

MatFormer's Mix'n'Match takes each layer's FFN width independently; counting MACs is a poor guide
to which mixes are fast (small matrix products are overhead-bound on a CPU), so the search ranks
slices by a **latency table measured on this machine**, as ``dynaslice profile --latency-table``
does for CNNs (:mod:`dynaslice.latency`: the same timing, table and file format).

What is timed is one **decode step**: one new token per sequence (``batch_size`` sequences)
after ``context`` tokens held in the KV cache -- what a served model repeats for every token it
generates. Every layer of a transformer has the same shapes, so a layer's time depends on its
FFN width and head count only, and the table holds that per (layer kind, width). It is measured
*in context*, from whole decode steps timed interleaved: at each depth, the largest slice and
the largest with every layer's FFN narrowed to each width or its heads cut to each count (see
:func:`fit_decode_table`). Blocks timed alone, as :func:`dynaslice.latency.build_latency_table`
does for CNNs, ran with their weights hot in the cache: in the first version of this table a
layer came out about a quarter faster than in a step that streams every layer's weights, and a
narrower FFN saved a fraction of what it saves there, so its predictions missed held-out steps
by tens of percent. Layer ``i``'s block is 0 ms at a depth that stops before it;
:func:`check_decode_table` compares predictions with slices timed end to end. Times are wall-clock, or with
``clock=time.thread_time`` the thread's CPU time: on a core other processes keep busy, a decode
step longer than the scheduler's slice almost never runs unpreempted, so even the minimum over
rounds of its wall-clock time counts other processes' work.

The search (:func:`search`) evaluates uniform slices and random Mix'n'Match slices on
validation batches, then mutates the Pareto front (predicted latency vs. perplexity) for a few
rounds. :func:`budget_table` times the front's slices end to end and writes a budget table in
PSS's format (:mod:`dynaslice.budget`: ``bucket``, ``arch``, ``macs``, ``val_accuracy``,
``latency_ms``) whose entries also carry ``params``, ``val_perplexity`` and
``predicted_latency_ms``; :class:`dynaslice.lm.serve.ElasticLM` serves it. ``val_accuracy`` is
the next-token top-1 accuracy (%); the front and the serving choice rank by perplexity.
"""

from __future__ import annotations

import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..latency import LatencyBlock, LatencyTable, measure_latency, subsample
from ..space import Arch
from .supernet import KVCache, LMSupernet, count_macs, count_params

TABLE_FORMAT = "dynaslice-budget-table"


# ---------------------------------------------------------------------------- quality


@torch.inference_mode()
def score_slice(
    net: LMSupernet, arch: Mapping[str, int], batches: Iterable[torch.Tensor]
) -> tuple[float, float]:
    """``(perplexity, top-1 %)`` of subnet ``arch`` predicting each next token of ``batches``
    (token ids ``[batch, tokens]``): ``exp`` of the mean negative log-likelihood over every
    predicted token, and how often its most likely token was the next one."""
    arch = net.space.validate(arch)
    nll = correct = count = 0.0
    was = net.training
    net.eval()
    try:
        for ids in batches:
            logits = net(ids, arch)[:, :-1].flatten(0, 1).float()
            target = ids[:, 1:].flatten()
            nll += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += float((logits.argmax(-1) == target).sum())
            count += target.numel()
    finally:
        net.train(was)
    if count == 0:
        raise ValueError("evaluating a language model needs batches of at least 2 tokens; got none")
    return math.exp(nll / count), 100.0 * correct / count


# ---------------------------------------------------------------------------- latency


def _decode_cache(net: LMSupernet, arch: Arch, context: int, batch_size: int) -> KVCache:
    """A KV cache of ``arch`` holding ``context`` tokens (random keys and values) in every layer it runs."""
    cache = KVCache(arch)
    param = next(net.parameters())
    for i in range(arch["depth"]):
        shape = (batch_size, net.kv_heads(arch[f"layers.{i}.heads"]), context, net.head_dim)
        cache.layers[i] = tuple(torch.randn(shape, dtype=param.dtype, device=param.device) for _ in "kv")
    cache.length = context
    return cache


def _step(net: LMSupernet, token: torch.Tensor, cache: KVCache, context: int) -> None:
    """One decode step of ``cache``'s arch, then its token dropped (every round times the same step)."""
    net.forward_cached(token, cache.arch, cache)
    cache.truncate(context)


@torch.inference_mode()
def measure_decode(
    net: LMSupernet,
    archs: Sequence[Mapping[str, int]],
    context: int = 128,
    batch_size: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Milliseconds of one decode step (:meth:`LMSupernet.forward_cached` of one token per
    sequence after ``context`` cached ones) of each arch, timed interleaved (minimum over rounds;
    ``clock``: :func:`~dynaslice.latency.measure_latency`'s; the minimum, as :mod:`dynaslice.latency`
    times: on a shared machine load only ever adds time)."""
    net.eval()
    token = torch.zeros(batch_size, 1, dtype=torch.long, device=next(net.parameters()).device)
    fns = {
        str(j): partial(
            _step, net, token, _decode_cache(net, net.space.validate(a), context, batch_size), context
        )
        for j, a in enumerate(archs)
    }
    times = measure_latency(fns, repeats=repeats, warmup=warmup, clock=clock)
    return [1e3 * min(times[str(j)]) for j in range(len(archs))]


def _uniform(net: LMSupernet, depth: int, **values: int) -> Arch:
    """The largest slice at ``depth`` with every layer's ``ffn`` / ``heads`` set to ``values``."""
    layers = {f"layers.{i}.{k}": v for i in range(net.n_stages) for k, v in values.items()}
    return net.space.validate({**net.space.largest().to_dict(), **layers, "depth": depth})


def _grids(net: LMSupernet, max_values: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The FFN widths and head counts a table times (the rest interpolated), and the depths."""
    return (subsample(net.space["layers.0.ffn"].choices, max_values),
            subsample(net.space["layers.0.heads"].choices, max_values), net.space["depth"].choices)  # fmt: skip


def table_archs(net: LMSupernet, max_values: int = 6) -> list[Arch]:
    """The slices whose decode steps make a latency table: at each depth, the largest, then the
    largest with every layer's FFN at each narrower width, then with each smaller head count."""
    ffn, heads, depths = _grids(net, max_values)
    return [a for d in depths for a in [_uniform(net, d)] + [_uniform(net, d, ffn=w) for w in ffn[:-1]]
            + [_uniform(net, d, heads=h) for h in heads[:-1]]]  # fmt: skip


def fit_decode_table(net: LMSupernet, ms: Sequence[float], max_values: int = 6) -> LatencyTable:
    """The table from the milliseconds of :func:`table_archs`' decode steps (in its order).

    At depth ``d`` a layer costs ``(step(largest) - a) / d``, where ``a`` (``overhead_ms``) is
    the intercept of the largest's steps over the depths, and a narrower FFN or fewer heads in
    every layer save ``(step(largest) - step(narrowed)) / d`` per layer: exact for every uniform
    slice timed, additive over the layers of a Mix'n'Match slice. Per depth, because a saving is
    not the same at every depth: on this machine a narrower FFN saved less per layer in a 1-layer
    step than in a 4-layer one (whose weights stream from further out in the cache)."""
    ffn, heads, depths = _grids(net, max_values)
    per = 1 + len(ffn) - 1 + len(heads) - 1
    steps = np.array(ms, dtype=np.float64).reshape(len(depths), per)  # [depth, largest | ffn | heads]
    full = steps[:, 0]
    fixed = float(np.polyfit(np.array(depths, dtype=np.float64), full, 1)[1]) if len(depths) > 1 else 0.0
    d = np.array(depths, dtype=np.float64)[:, None]
    d_ffn = np.concatenate([(steps[:, 1 : len(ffn)] - full[:, None]) / d, np.zeros((len(depths), 1))], axis=1)
    d_heads = np.concatenate([(steps[:, len(ffn) :] - full[:, None]) / d, np.zeros((len(depths), 1))], axis=1)
    layer = (full - fixed)[:, None, None] / d[:, :, None] + d_ffn[:, :, None] + d_heads[:, None, :]
    layer = layer.transpose(1, 2, 0)  # [ffn, heads, depth]
    blocks = []
    for i in range(net.n_stages):
        runs_here = (np.array(depths) > i).astype(np.float64)  # layer i runs at depth > i
        dims = (f"layers.{i}.ffn", f"layers.{i}.heads", "depth")
        blocks.append(LatencyBlock(f"layers.{i}", dims, (ffn, heads, depths), layer * runs_here))
    return LatencyTable(blocks, fixed)


@torch.inference_mode()
def decode_latency_table(
    net: LMSupernet,
    context: int = 128,
    batch_size: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    max_values: int = 6,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyTable:
    """The latency table of one decode step of ``net`` on this machine (see the module docstring).

    ``max_values``: FFN widths and head counts timed (evenly spread, ends included; the rest
    interpolated); ``clock``: wall-clock, or ``time.thread_time`` on a core other processes keep
    busy (:func:`~dynaslice.latency.measure_latency`); the table records which, and its checks use it.
    """
    if not net.CAUSAL:
        raise ValueError(f"{net.family} is an encoder: it has no decode step to time")
    ms = measure_decode(net, table_archs(net, max_values), context, batch_size, repeats, warmup, clock)
    table = fit_decode_table(net, ms, max_values)
    table.meta = {
        "model": net.family,
        "what": "one decode step: one new token per sequence after `context` cached tokens",
        "context": context,
        "batch_size": batch_size,
        "clock": clock.__name__,
        "repeats": repeats,
        "max_values": max_values,
        "device": next(net.parameters()).device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    return table


def _clock(table: LatencyTable) -> Callable[[], float]:
    """The clock ``table`` was measured with (its checks time with the same)."""
    return getattr(time, (table.meta or {}).get("clock", "perf_counter"))


def _errors(rows: Sequence[Mapping[str, float]], key: str) -> dict[str, float]:
    errs = [abs(r[key] - r["measured_ms"]) / r["measured_ms"] * 100 for r in rows]
    return {"median_abs_pct_error": statistics.median(errs), "max_abs_pct_error": max(errs)}


def check_decode_table(
    table: LatencyTable,
    net: LMSupernet,
    n: int = 20,
    seed: int = 1,
    repeats: int = 20,
    archs: Sequence[Mapping[str, int]] = (),
) -> dict[str, Any]:
    """Predicted vs measured decode-step latency of ``archs`` and ``n`` random slices (held out:
    the table was not fitted on them).

    They are timed in the same interleaved rounds as the table's own slices, which gives two
    predictions for each: ``predicted_ms``, the table's, and ``refit_ms``, a table fitted on these
    rounds. The second is the table's model alone; the first adds whatever changed on the machine
    since the table was measured (on a shared machine, the other processes' load).
    """
    rng = random.Random(seed + 12345)
    archs = [net.space.validate(a) for a in archs] + [net.space.sample(rng) for _ in range(n)]
    meta = table.meta or {}
    max_values = meta.get("max_values", 6)
    own = table_archs(net, max_values)
    measured = measure_decode(net, own + archs, meta.get("context", 128), meta.get("batch_size", 1), repeats,
                              clock=_clock(table))  # fmt: skip
    refit = fit_decode_table(net, measured[: len(own)], max_values)
    rows = [{"arch": a.to_dict(), "predicted_ms": table.predict(a), "refit_ms": refit.predict(a), "measured_ms": m}
            for a, m in zip(archs, measured[len(own) :], strict=True)]  # fmt: skip
    return {"archs": rows, **_errors(rows, "predicted_ms"), "refit": _errors(rows, "refit_ms")}


@dataclass(frozen=True)
class Candidate:
    """One evaluated slice: its predicted decode-step latency, validation perplexity and top-1 (%)."""

    arch: Arch
    latency_ms: float
    val_perplexity: float
    val_accuracy: float


def pareto(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The candidates no other one beats on both latency and perplexity, fastest first."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.latency_ms, c.val_perplexity)):
        if not front or c.val_perplexity < front[-1].val_perplexity:
            front.append(c)
    return front


def aligned_choices(net: LMSupernet, align: int) -> dict[str, tuple[int, ...]]:
    """Every dimension's choices, FFN widths only those that are multiples of ``align`` (and the
    full width): widths that map onto whole SIMD registers, or FLOPs drop but time does not."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    out = {}
    for d in net.space.dims:
        keep = d.choices
        if d.name.endswith(".ffn"):
            keep = tuple(c for c in d.choices if c % align == 0 or c == d.max)
        out[d.name] = keep
    return out


def canonical(net: LMSupernet, arch: Mapping[str, int]) -> Arch:
    """``arch`` validated, with the layers past its depth at their largest: slices that differ
    only there compute the same function, so the search evaluates one of them."""
    arch = net.space.validate(arch)
    unused = {f"layers.{i}.{k}": net.space[f"layers.{i}.{k}"].max
              for i in range(arch["depth"], net.n_stages) for k in ("ffn", "heads")}  # fmt: skip
    return arch.replace(**unused)


def uniform_slices(net: LMSupernet, choices: Mapping[str, Sequence[int]]) -> list[Arch]:
    """Slices with the same FFN width and head count in every layer, at every depth."""
    layers = net.n_stages
    out = []
    for w in choices["layers.0.ffn"]:
        for h in choices["layers.0.heads"]:
            for depth in choices["depth"]:
                values = {f"layers.{i}.{k}": v for i in range(layers) for k, v in (("ffn", w), ("heads", h))}
                out.append(net.space.validate({**values, "depth": depth}))
    return out


def _mutate(arch: Arch, choices: Mapping[str, Sequence[int]], rng: random.Random) -> Arch:
    """``arch`` with one dimension moved one step along its choices."""
    name = rng.choice([n for n, c in choices.items() if len(c) > 1])
    values = list(choices[name])
    j = values.index(arch[name]) if arch[name] in values else 0
    j = min(max(j + rng.choice((-1, 1)), 0), len(values) - 1)
    return arch.replace(**{name: values[j]})


def search(
    net: LMSupernet,
    table: LatencyTable,
    batches: Sequence[torch.Tensor],
    samples: int = 100,
    rounds: int = 4,
    children: int = 25,
    align: int = 8,
    seed: int = 0,
) -> tuple[list[Candidate], list[Candidate]]:
    """Mix'n'Match search: returns ``(front, evaluated)``, the Pareto front (table-predicted
    latency vs. perplexity on ``batches``) and every candidate evaluated.

    Starts from every uniform slice and ``samples`` random per-layer slices (FFN widths aligned
    to ``align``), then ``rounds`` times evaluates ``children`` one-step mutations of front members.
    """
    rng = random.Random(seed)
    choices = aligned_choices(net, align)
    seen: dict[Arch, Candidate] = {}

    def add(arch: Arch) -> None:
        arch = canonical(net, arch)
        if arch not in seen:
            ppl, top1 = score_slice(net, arch, batches)
            seen[arch] = Candidate(arch, table.predict(arch), ppl, top1)

    for a in uniform_slices(net, choices):
        add(a)
    for _ in range(samples):
        add(Arch({n: rng.choice(c) for n, c in choices.items()}))
    for _ in range(rounds):
        front = pareto(seen.values())
        for _ in range(children):
            add(_mutate(rng.choice(front).arch, choices, rng))
    return pareto(seen.values()), list(seen.values())


def budget_table(
    net: LMSupernet,
    front: Sequence[Candidate],
    table: LatencyTable,
    repeats: int = 20,
    candidates: int = 1,
) -> dict[str, Any]:
    """The budget table (PSS's format, see the module docstring) of the slices of ``front``
    that stay Pareto-optimal once each is timed end to end: measured decode-step latency and
    validation perplexity, fastest first. ``candidates``: how many slices the search evaluated."""
    meta = table.meta or {}
    context, batch = meta.get("context", 128), meta.get("batch_size", 1)
    measured = measure_decode(net, [c.arch for c in front], context, batch, repeats, clock=_clock(table))
    timed = [
        Candidate(c.arch, m, c.val_perplexity, c.val_accuracy) for c, m in zip(front, measured, strict=True)
    ]
    predicted = {c.arch: c.latency_ms for c in front}
    entries = [
        {
            "bucket": round(c.latency_ms, 4),
            "arch": c.arch.to_dict(),
            "macs": count_macs(net, c.arch, context=context),
            "val_accuracy": c.val_accuracy,
            "candidates": candidates,
            "latency_ms": c.latency_ms,
            "predicted_latency_ms": predicted[c.arch],
            "params": count_params(net, c.arch),
            "val_perplexity": c.val_perplexity,
        }
        for c in pareto(timed)
    ]
    return {
        "format": TABLE_FORMAT,
        "version": 2,
        "metric": "latency",
        "latency": f"ms of one decode step after {context} cached tokens, batch {batch}, measured here "
        f"({meta.get('clock', 'perf_counter')})",
        "macs": f"MACs per token at context {context}",
        "val_accuracy": "next-token top-1 (%) on the validation batches",
        "entries": entries,
    }
