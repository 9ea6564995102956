"""One set of weights serving every budget (issue 32, item 5): memory, switching, speculative decoding.

With a nested LM run and its budget table (bench/bench_lm_search.py's JSON):

- resident memory: a process serving requests at 4 budgets of the table through one
  :class:`~dynaslice.lm.ElasticLM` vs a process serving the largest slice alone, exported as a
  Hugging Face checkpoint and run by ``transformers`` (``generate``, greedy); both import the same
  libraries, and each reports VmRSS after serving and VmHWM (the peak) from /proc/self/status, and
  the same after its imports (what the model and serving add is the difference);
- switching: microseconds to pick a request's slice (cycling through the 4 budgets), and a decode
  step right after a switch vs one of the same slice again (paired ratio);
- self-speculative decoding: tokens/s of :meth:`ElasticLM.speculative` (the table's slices as
  drafts, ``k`` drafted tokens per verification) vs greedy decoding by the largest, the same
  prompts, interleaved rounds, median of paired ratios; outputs checked identical. The draft and
  ``k`` are chosen on validation prompts, the speed-up is measured on test prompts.

Times are the timing thread's CPU time by default (``--clock thread_time``: one thread, on a core
other processes keep busy, where even the best of many rounds of wall-clock time includes their
work); ``--clock perf_counter --threads 2`` times wall-clock on two quiet cores.

    taskset -c 0 python bench/bench_lm_serving.py --run runs/lm_demo/nested --table runs/lm_demo/nested \
        --ks 2 3 4 --out bench/out/lm_serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from common import cpu_facts, output_args, set_threads, write_results

from dynaslice.latency import measure_latency, paired_ratio
from dynaslice.lm import ElasticLM, KVCache, export_hf
from dynaslice.lm.data import load_text_split
from dynaslice.lm.serve import load_table
from dynaslice.lm.train import load_lm_run


def status_kb() -> dict[str, int]:
    """VmRSS and VmHWM (kB) of this process, from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def prompts(cfg, split: str, n: int, length: int) -> list[torch.Tensor]:
    """The first ``length`` tokens of ``n`` blocks spread over ``split``."""
    blocks = load_text_split(cfg.data.root, split, cfg.data.seq_len).blocks
    step = max(1, len(blocks) // n)
    return [blocks[i * step, :length][None] for i in range(n)]


def budgets(entries: list[dict]) -> list[dict[str, float]]:
    """4 requests' budgets: latency, params and MACs limits that pick 4 different table slices."""
    picks = [entries[round(j * (len(entries) - 1) / 3)] for j in range(4)]
    kinds = ("max_latency_ms", "max_params", "max_macs", "max_latency_ms")
    field = {"max_latency_ms": "latency_ms", "max_params": "params", "max_macs": "macs"}
    return [{kind: e[field[kind]]} for kind, e in zip(kinds, picks, strict=True)]


def child(args: argparse.Namespace) -> None:
    """One process of the memory comparison (``--rss largest DIR`` or ``--rss elastic``): prints JSON."""
    import transformers

    set_threads(args.threads)
    ps = torch.load(Path(args.largest_dir).parent / "prompts.pt")
    base = status_kb()
    if args.rss == "elastic":
        net, _, _, _ = load_lm_run(args.run)
        lm = ElasticLM(net, load_table(args.table))
        for p, budget in zip(ps, budgets(lm.entries), strict=True):
            lm.generate(p, args.new, **budget)
    else:  # the largest alone: transformers' own model, loaded from its exported checkpoint
        model = transformers.AutoModelForCausalLM.from_pretrained(args.largest_dir).eval()
        with torch.inference_mode():
            for p in ps:
                model.generate(p, max_new_tokens=args.new, do_sample=False, pad_token_id=0)
    print(json.dumps({"after_imports": base, "after_serving": status_kb()}))


def memory(args: argparse.Namespace, net, ps: list[torch.Tensor]) -> dict:
    """Both processes of the memory comparison, one after the other, on the 4 prompts ``ps``."""
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(net, net.space.largest(), Path(tmp) / "largest")
        torch.save(ps, Path(tmp) / "prompts.pt")
        out = {}
        for kind in ("largest", "elastic"):
            cmd = [sys.executable, __file__, "--rss", kind, "--largest-dir", str(Path(tmp) / "largest"),
                   "--run", args.run, "--table", args.table, "--prompt", str(args.prompt), "--new", str(args.new),
                   "--threads", str(args.threads)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if done.returncode:
                sys.exit(f"the {kind} process failed:\n{done.stderr}")
            out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    grown = {k: v["after_serving"]["VmRSS"] - v["after_imports"]["VmRSS"] for k, v in out.items()}
    return {
        **out,
        "rss_ratio": out["elastic"]["after_serving"]["VmRSS"] / out["largest"]["after_serving"]["VmRSS"],
        "peak_ratio": out["elastic"]["after_serving"]["VmHWM"] / out["largest"]["after_serving"]["VmHWM"],
        "model_and_serving_kb": grown,
        "model_and_serving_ratio": grown["elastic"] / grown["largest"],
    }


@torch.inference_mode()
def switching(
    lm: ElasticLM, asks: list[dict[str, float]], context: torch.Tensor, repeats: int, clock
) -> dict:
    """Microseconds to pick a slice, and a decode step after a switch vs after the same slice."""
    n = 2000
    t0 = clock()
    for j in range(n):
        lm.arch(**asks[j % len(asks)])
    pick_us = (clock() - t0) / n * 1e6
    archs = [lm.arch(**b) for b in asks]
    caches = []
    for a in archs:
        cache = KVCache(a)
        lm.net.forward_cached(context, a, cache)
        caches.append(cache)
    token = context[:, -1:]
    length = context.shape[1]

    def step(j: int) -> None:
        lm.net.forward_cached(token, lm.arch(**asks[j]), caches[j])
        caches[j].truncate(length)

    def switched() -> None:  # every budget once: each step runs another slice than the last
        for j in range(len(asks)):
            step(j)

    def same() -> None:  # the same steps grouped by slice: a switch every 4 steps at most
        for j in range(len(asks)):
            for _ in range(4):
                step(j)

    times = measure_latency(
        {"switched": lambda: [switched() for _ in range(4)], "same": same}, repeats=repeats, clock=clock
    )
    return {"pick_us": pick_us, "switched_over_same": paired_ratio(times, "switched", "same"), "budgets": asks,
            "archs": [a.to_dict() for a in archs]}  # fmt: skip


def speed(lm: ElasticLM, ps: list[torch.Tensor], new: int, draft, k: int, repeats: int, clock) -> dict:
    """Greedy by the largest vs speculative with ``draft``/``k`` on prompts ``ps``: paired ratio of
    times, tokens/s of each, acceptance, and whether every output was identical."""
    outs = {}

    def greedy() -> None:
        outs["greedy"] = [lm.generate(p, new) for p in ps]

    def spec() -> None:
        outs["spec"] = [lm.speculative(p, new, draft, k) for p in ps]

    times = measure_latency({"greedy": greedy, "spec": spec}, repeats=repeats, warmup=1, clock=clock)
    same = all(torch.equal(g, s) for g, (s, _) in zip(outs["greedy"], outs["spec"], strict=True))
    stats = [st for _, st in outs["spec"]]
    tokens = new * len(ps)
    return {
        "draft": dict(draft), "k": k, "identical": same,
        "speedup": paired_ratio(times, "greedy", "spec"),
        "greedy_tokens_per_s": tokens / sorted(times["greedy"])[len(times["greedy"]) // 2],
        "spec_tokens_per_s": tokens / sorted(times["spec"])[len(times["spec"]) // 2],
        "acceptance": sum(s.accepted for s in stats) / sum(s.drafted for s in stats),
        "tokens_per_round": tokens / sum(s.rounds for s in stats),
    }  # fmt: skip


@torch.inference_mode()
def step_costs(lm: ElasticLM, draft, k: int, context: torch.Tensor, repeats: int, clock) -> dict:
    """Why the speed-up is what it is: the largest's forward over ``k + 1`` tokens (a
    verification) and the draft's decode step, each over the largest's decode step, after the
    same cached ``context`` (paired ratios of interleaved rounds)."""
    largest, n = lm.largest, context.shape[1]
    caches = {"one": KVCache(largest), "verify": KVCache(largest), "draft": KVCache(draft)}
    for cache in caches.values():
        lm.net.forward_cached(context, cache.arch, cache)
    feeds = {"one": context[:, -1:], "verify": context[:, -k - 1 :], "draft": context[:, -1:]}

    def run(name: str) -> None:
        lm.net.forward_cached(feeds[name], caches[name].arch, caches[name])
        caches[name].truncate(n)

    times = measure_latency({name: partial(run, name) for name in caches}, repeats=repeats, clock=clock)
    return {
        "context": n, "largest_step_ms": 1e3 * min(times["one"]),
        "verify_over_step": paired_ratio(times, "verify", "one"),
        "draft_over_step": paired_ratio(times, "draft", "one"),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/lm_demo/nested", help="a nested language-model run")
    ap.add_argument("--table", default="bench/out/lm_search.json", help="its budget table (lm_search's JSON)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10, help="interleaved rounds of the speed comparison")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 6])
    ap.add_argument("--clock", choices=["thread_time", "perf_counter"], default="thread_time",
                    help="CPU time of the timing thread (a busy core, one thread) or wall-clock")  # fmt: skip
    ap.add_argument("--rss", choices=["largest", "elastic"], help=argparse.SUPPRESS)
    ap.add_argument("--largest-dir", help=argparse.SUPPRESS)
    output_args(ap, out="bench/out/lm_serving.json", threads=1)
    args = ap.parse_args()
    if args.rss:
        return child(args)
    set_threads(args.threads)
    start, load = time.time(), os.getloadavg()
    net, _, cfg, file = load_lm_run(args.run)
    lm = ElasticLM(net, load_table(args.table))
    asks = budgets(lm.entries)
    val, test = (
        prompts(cfg, "val", args.prompts, args.prompt),
        prompts(cfg, "test", args.prompts, args.prompt),
    )
    mem = memory(args, net, prompts(cfg, "test", 4, args.prompt))
    print(
        f"memory: RSS {mem['rss_ratio']:.3f}x, model and serving {mem['model_and_serving_ratio']:.3f}x",
        flush=True,
    )
    clock = getattr(time, args.clock)
    switch = switching(lm, asks, val[0], args.repeats * 10, clock)
    print(
        f"switching: {switch['pick_us']:.1f} us to pick, step after a switch {switch['switched_over_same']:.3f}x"
    )

    spread = [lm.archs[round(j * (len(lm.archs) - 2) / 4)] for j in range(5)] if len(lm.archs) > 1 else []
    depths = [net.space.largest().replace(depth=d) for d in range(1, net.n_stages)]
    drafts = list(dict.fromkeys(spread + depths))  # table slices but the largest, and shallower ones
    chosen = []
    for draft in drafts:
        for k in args.ks:
            r = speed(lm, val[:2], args.new, draft, k, 2, clock)
            chosen.append(r)
            print(f"  val: k={k} {r['speedup']:.2f}x accept {r['acceptance']:.2f} {dict(draft)}", flush=True)
    best = max(chosen, key=lambda r: r["speedup"])
    draft = net.space.validate(best["draft"])
    final = speed(lm, test, args.new, draft, best["k"], args.repeats, clock)
    print(f"speculative on test prompts: {final['speedup']:.3f}x, identical {final['identical']}", flush=True)
    costs = step_costs(lm, draft, best["k"], lm.generate(test[0], args.new // 2), args.repeats * 10, clock)
    print(
        f"  verify {costs['verify_over_step']:.2f}x a step, draft {costs['draft_over_step']:.2f}x", flush=True
    )
    write_results(args.out, {
        "benchmark": "lm_serving",
        "command": f"taskset -c {','.join(map(str, sorted(os.sched_getaffinity(0))))} python " + " ".join(sys.argv),
        "run": str(args.run), "model_file": str(file), "table": args.table, **cpu_facts(),
        "load_average_at_start": load, "clock": args.clock,
        "prompt_tokens": args.prompt, "new_tokens": args.new, "prompts": args.prompts,
        "memory": mem, "switching": switch, "draft_selection_val": chosen, "speculative_test": final,
        "step_costs": costs,
        "seconds": time.time() - start,
    })  # fmt: skip


if __name__ == "__main__":
    main()
