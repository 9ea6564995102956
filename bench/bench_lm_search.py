"""Mix'n'Match search on measured latency (issue 32, item 3): the budget table of a nested LM run.

Builds the decode-step latency table of the run's supernet on this machine (one token after
``--context`` cached ones, batch 1); searches per-layer FFN widths, heads and depth
(:func:`dynaslice.lm.search.search`, perplexity on ``--val-blocks`` validation blocks spread
over the split); times the Pareto slices end to end and writes them as a budget table (PSS's
format), into the run directory too (``budget_table.json``, where
:class:`~dynaslice.lm.ElasticLM` reads it); checks the table's predictions against the front's slices and held-out random ones timed end to
end, in the same rounds as the table's own slices (so also against a table refitted on those
rounds). Then compares with uniform slices at equal *measured* latency: for each uniform slice,
the best table slice no slower than it, perplexity on the validation blocks and on
``--test-blocks`` spread over the test split (held out from the search).

    taskset -c 0 python bench/bench_lm_search.py --run runs/lm_demo/nested --val-blocks 64 \
        --test-blocks 128 --samples 60 --rounds 4 --children 25 --out bench/out/lm_search.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from common import cpu_facts, output_args, set_threads, write_results

from dynaslice import runs
from dynaslice.atomic import atomic_write_json
from dynaslice.lm.data import load_text_split
from dynaslice.lm.search import (
    aligned_choices,
    budget_table,
    canonical,
    check_decode_table,
    decode_latency_table,
    measure_decode,
    score_slice,
    search,
    uniform_slices,
)
from dynaslice.lm.supernet import count_params
from dynaslice.lm.train import load_lm_run


def batches(blocks, n: int, size: int = 8) -> list:
    """``n`` blocks spread evenly over the split (all with 0) as batches of token ids
    ``[size, seq_len + 1]``: the first ones would be a few documents of one corpus file."""
    data = blocks.blocks
    if 0 < n < len(data):
        data = data[torch.linspace(0, len(data) - 1, n).round().long()]
    return [data[i : i + size] for i in range(0, len(data), size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/lm_demo/nested", help="a nested language-model run")
    ap.add_argument("--context", type=int, default=64, help="cached tokens before the timed decode step")
    ap.add_argument("--repeats", type=int, default=30, help="interleaved rounds per timing (minimum kept)")
    ap.add_argument("--check", type=int, default=20, help="held-out random slices timed to check the table")
    ap.add_argument(
        "--val-blocks", type=int, default=64, help="validation blocks scoring the search (0: all)"
    )
    ap.add_argument("--test-blocks", type=int, default=256, help="test blocks of the comparison (0: all)")
    ap.add_argument("--samples", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--children", type=int, default=30)
    ap.add_argument("--align", type=int, default=16, help="FFN widths: multiples of this")
    ap.add_argument("--clock", choices=["thread_time", "perf_counter"], default="thread_time",
                    help="CPU time of the timing thread (a busy core) or wall-clock (a quiet one)")  # fmt: skip
    output_args(ap, out="bench/out/lm_search.json", threads=1)
    args = ap.parse_args()
    set_threads(args.threads)
    start, load = time.time(), os.getloadavg()
    net, meta, cfg, file = load_lm_run(args.run)
    val = batches(load_text_split(cfg.data.root, "val", cfg.data.seq_len), args.val_blocks)
    test = batches(load_text_split(cfg.data.root, "test", cfg.data.seq_len), args.test_blocks)

    clock = getattr(time, args.clock)
    table = decode_latency_table(net, context=args.context, repeats=args.repeats, clock=clock)
    front, seen = search(net, table, val, args.samples, args.rounds, args.children, args.align)
    print(f"search: {len(seen)} slices scored, {len(front)} on the predicted front", flush=True)
    written = budget_table(net, front, table, repeats=args.repeats, candidates=len(seen))
    entries = written["entries"]
    errors = [abs(e["predicted_latency_ms"] - e["latency_ms"]) / e["latency_ms"] * 100 for e in entries]
    # the table's slices, the front's and held-out random ones, in the same interleaved rounds
    check = check_decode_table(
        table, net, n=args.check, repeats=args.repeats, archs=[e["arch"] for e in entries]
    )
    print(f"latency table: held-out error median {check['median_abs_pct_error']:.1f} %, "
          f"max {check['max_abs_pct_error']:.1f} % (refitted in the same rounds: "
          f"{check['refit']['median_abs_pct_error']:.1f} %, {check['refit']['max_abs_pct_error']:.1f} %)", flush=True)  # fmt: skip

    # uniform slices at equal measured latency: the best table slice no slower than each
    scored = {c.arch: c for c in seen}
    uniform = [canonical(net, a) for a in uniform_slices(net, aligned_choices(net, args.align))]
    uniform = list(dict.fromkeys(uniform))
    timed = list(dict.fromkeys(uniform + [net.space.validate(e["arch"]) for e in entries]))  # each once
    ms_of = dict(
        zip(timed, measure_decode(net, timed, args.context, repeats=args.repeats, clock=clock), strict=True)
    )
    uni_ms = [ms_of[a] for a in uniform]
    entry_ms = [ms_of[net.space.validate(e["arch"])] for e in entries]
    rows = []
    for a, ms in zip(uniform, uni_ms, strict=True):
        fits = [(e, m) for e, m in zip(entries, entry_ms, strict=True) if m <= ms]
        if not fits:
            continue
        best, best_ms = min(fits, key=lambda p: p[0]["val_perplexity"])
        best_arch = net.space.validate(best["arch"])
        rows.append({
            "uniform": a.to_dict(), "uniform_ms": ms, "uniform_params": count_params(net, a),
            "uniform_val_ppl": scored[a].val_perplexity, "uniform_test_ppl": score_slice(net, a, test)[0],
            "mix": best["arch"], "mix_ms": best_ms, "mix_params": best["params"],
            "mix_val_ppl": best["val_perplexity"], "mix_test_ppl": score_slice(net, best_arch, test)[0],
            "same_slice": best_arch == a,
        })  # fmt: skip
    best_so_far = math.inf  # the uniform slices a user would pick: none faster has lower val perplexity
    for r in sorted(rows, key=lambda r: r["uniform_ms"]):
        r["uniform_front"] = r["uniform_val_ppl"] < best_so_far
        best_so_far = min(best_so_far, r["uniform_val_ppl"])
    differ = [r for r in rows if not r["same_slice"]]
    front_rows = [r for r in rows if r["uniform_front"]]
    better = [r for r in differ if r["mix_test_ppl"] < r["uniform_test_ppl"]]
    print(f"uniform slices: {len(rows)} compared, the table's slice is another for {len(differ)}, "
          f"lower test perplexity for {len(better)}", flush=True)  # fmt: skip

    # in the run directory too, where ElasticLM(net, RUN) reads it
    atomic_write_json(Path(args.run) / runs.BUDGET_TABLE, written, indent=1)
    print(f"wrote {Path(args.run) / runs.BUDGET_TABLE}")
    write_results(args.out, {
        "benchmark": "lm_search",
        "command": "taskset -c 0 python " + " ".join(sys.argv),
        "run": str(args.run), "model_file": str(file), **cpu_facts(),
        "timing": "one decode step (one token after --context cached ones, batch 1), the minimum over "
                  "--repeats interleaved rounds, one thread pinned to one core, measured by --clock",
        "clock": args.clock, "load_average_at_start": load,
        "context": args.context, "repeats": args.repeats, "align": args.align,
        "val_blocks": args.val_blocks, "test_blocks": args.test_blocks, "val_tokens": sum(b[:, 1:].numel() for b in val),
        "test_tokens": sum(b[:, 1:].numel() for b in test),
        "latency_table": table.to_dict(), "table_check": check,
        "front_prediction_error_pct": {"median": sorted(errors)[len(errors) // 2], "max": max(errors)},
        "searched": len(seen), "budget_table": written,
        "uniform_vs_mix": rows,
        "summary": {
            "compared": len(rows), "table_slice_differs": len(differ), "mix_better_test": len(better),
            "uniform_front": len(front_rows),
            "uniform_front_mix_better_test": sum(r["mix_test_ppl"] < r["uniform_test_ppl"] for r in front_rows),
            "uniform_front_mix_better_val": sum(r["mix_val_ppl"] < r["uniform_val_ppl"] for r in front_rows),
        },
        "seconds": time.time() - start,
    })  # fmt: skip


if __name__ == "__main__":
    main()
