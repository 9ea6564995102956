"""Issue 32's first goal on Debian's fortunes corpus: nested widths against the same sizes trained alone.

Four runs of ``dynaslice train`` (the library's :func:`dynaslice.lm.train.train_lm`), one after
the other, all with one thread (run the script under ``taskset -c 0``):

1. ``user``: the user's trained model, a byte-level Llama (hidden 256, 4 layers, 4 heads / 2 KV
   heads, FFN 1024, 128-byte blocks) from scratch on ``--tokens-blocks`` blocks of the training split;
2. ``alone-x0.5``, ``alone-x0.25``: the FFN widths 512 and 256 trained alone, the same recipe and
   the same blocks (a model of that size: the uniform slice trained on its own), for as many
   tokens as the user's model;
   ``alone-x0.5-family``, ``alone-x0.25-family``: the same for as many tokens as the whole family
   (the user's model plus the nested training: the same blocks and half as many again). The goal compares
   against these, "the same-size model trained alone for the same tokens": a nested width
   inherits the tokens its user's model read;
3. ``nested``: configs/lm_demo.yaml, MatFormer's nested widths x1, x0.5, x0.25 trained jointly
   from the user's model (its FFN units sorted by importance) with in-place distillation, on the
   first half of the same blocks.

Each width's perplexity (per byte) on the validation and test splits; the goal: each nested
width within 2 % of the same size trained alone, and the family (the user's model plus the
nested training) with <= 0.5x the tokens of training the three sizes separately. Tokens,
training FLOPs (analytic, :meth:`LMTrainer.train_flops`) and wall-clock beside. A finished run
is not trained again (its recorded result is read): the script resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from common import cpu_facts, write_results

from dynaslice.lm.data import load_text_split
from dynaslice.lm.train import load_lm_run, perplexity, train_lm
from dynaslice.train.config import load_config

CONFIG = "configs/lm_demo.yaml"
GOAL_GAP = 0.02
GOAL_TOKENS = 0.5


def alone(width: float, blocks: int) -> list[str]:
    """One width trained alone from scratch on ``blocks`` blocks: the user's model's recipe."""
    return [
        "train.sampler=fixed", f"train.fixed_width={width}", "train.target=labels", "train.init_from=null",
        "train.order_channels=false", f"data.train_size={blocks}", "optim.lr=0.002",
    ]  # fmt: skip


def test_ppl(run: Path, names: list[str]) -> dict[str, float]:
    net, _, cfg, _ = load_lm_run(run)
    test = load_text_split(cfg.data.root, "test", cfg.data.seq_len)
    archs = {"x1": 1.0, "x0.5": 0.5, "x0.25": 0.25}
    return {n: perplexity(net, net.space.uniform(archs[n]), test)["ppl"] for n in names}


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "| width | params (M) | nested val ppl | alone, user's tokens: val ppl | gap | alone, family's tokens: val ppl "
        "| gap | nested test ppl | alone, family's tokens: test ppl | gap |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["rows"]:
        same = [r.get(k) for k in ("same_tokens_val_ppl", "same_tokens_val_gap", "same_tokens_test_ppl", "same_tokens_test_gap")]
        same_val, same_val_gap, same_test, same_test_gap = (
            (f"{same[0]:.3f}", f"{100 * same[1]:+.1f} %", f"{same[2]:.3f}", f"{100 * same[3]:+.1f} %")
            if same[0] is not None else ("-",) * 4
        )
        lines.append(
            f"| {r['width']} | {r['params'] / 1e6:.2f} | {r['nested_val_ppl']:.3f} | {r['alone_val_ppl']:.3f} | "
            f"{100 * r['val_gap']:+.1f} % | {same_val} | {same_val_gap} | {r['nested_test_ppl']:.3f} | "
            f"{same_test} | {same_test_gap} |"
        )
    lines += ["", "| run | tokens | training PFLOPs | wall-clock |", "| --- | ---: | ---: | ---: |"]
    for name, c in data["runs"].items():
        lines.append(
            f"| {name} | {c['train_tokens']} | {c['train_pflops']:.3f} | {c['train_seconds'] / 60:.1f} min |"
        )
    f = data["family"]
    lines += [
        "",
        f"Family (user's model + nested): {f['tokens']} tokens, {f['pflops']:.3f} PFLOPs, "
        f"{f['seconds'] / 60:.1f} min; the three sizes separately: {f['separate_tokens']} tokens, "
        f"{f['separate_pflops']:.3f} PFLOPs, {f['separate_seconds'] / 60:.1f} min: "
        f"{f['token_ratio']:.2f}x the tokens, {f['flops_ratio']:.2f}x the FLOPs, {f['seconds_ratio']:.2f}x the time.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/lm_demo", help="where the four runs are trained (resumable)")
    ap.add_argument(
        "--tokens-blocks",
        type=int,
        default=5120,
        help="training blocks of the user's model and of each alone run",
    )
    ap.add_argument("--out", default="bench/out/lm_nested.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides of every run (smoke runs)")
    args = ap.parse_args()
    root = Path(args.runs)
    plan = {
        "user": alone(1.0, args.tokens_blocks),
        "alone-x0.5": alone(0.5, args.tokens_blocks),
        "alone-x0.25": alone(0.25, args.tokens_blocks),
        "nested": [f"train.init_from={root / 'user'}", f"data.train_size={args.tokens_blocks // 2}"],
    }
    family_blocks = args.tokens_blocks + args.tokens_blocks // 2  # the user's model's blocks, then nested's
    plan.update({f"alone-{w}-family": alone(float(w[1:]), family_blocks) for w in ("x0.5", "x0.25")})
    results: dict[str, Any] = {}
    for name, overrides in plan.items():
        print(
            f"== {name}: dynaslice train {CONFIG} --out {root / name} "
            + " ".join(f"--set {o}" for o in overrides),
            flush=True,
        )
        results[name] = train_lm(load_config(CONFIG, args.set + overrides), root / name, resume=True)
    alone_runs = {"x1": "user", "x0.5": "alone-x0.5", "x0.25": "alone-x0.25"}
    nested_test = test_ppl(root / "nested", list(alone_runs))
    rows = []
    for row in results["nested"]["subnets"]:
        width = row["name"]
        single = results[alone_runs[width]]["subnets"][0]
        alone_test = test_ppl(root / alone_runs[width], [width])[width]
        rows.append({
            "width": width, "arch": row["arch"], "params": row["params"], "macs_per_token": row["macs_per_token"],
            "nested_val_ppl": row["val_ppl"], "alone_val_ppl": single["val_ppl"],
            "val_gap": row["val_ppl"] / single["val_ppl"] - 1,
            "nested_test_ppl": nested_test[width], "alone_test_ppl": alone_test,
            "test_gap": nested_test[width] / alone_test - 1,
        })  # fmt: skip
        if f"alone-{width}-family" in results:  # x1's same-tokens run is the nested x1 itself
            same = results[f"alone-{width}-family"]["subnets"][0]
            same_test = test_ppl(root / f"alone-{width}-family", [width])[width]
            rows[-1].update({
                "same_tokens_val_ppl": same["val_ppl"], "same_tokens_val_gap": row["val_ppl"] / same["val_ppl"] - 1,
                "same_tokens_test_ppl": same_test, "same_tokens_test_gap": nested_test[width] / same_test - 1,
            })  # fmt: skip
        print(rows[-1], flush=True)
    keys = ("train_tokens", "train_flops", "train_seconds", "steps")
    run_costs = {
        name: {**{k: r[k] for k in keys}, "train_pflops": r["train_flops"] / 1e15}
        for name, r in results.items()
    }

    def total(names: list[str], key: str) -> float:
        return sum(run_costs[n][key] for n in names)

    family, separate = ["user", "nested"], ["user", "alone-x0.5", "alone-x0.25"]
    fam = {
        "tokens": total(family, "train_tokens"), "flops": total(family, "train_flops"),
        "seconds": total(family, "train_seconds"), "separate_tokens": total(separate, "train_tokens"),
        "separate_flops": total(separate, "train_flops"), "separate_seconds": total(separate, "train_seconds"),
    }  # fmt: skip
    fam.update(
        separate_family_tokens=3 * fam["tokens"],  # each of the three sizes alone on the family's tokens
        family_token_ratio=1 / 3,
        pflops=fam["flops"] / 1e15,
        separate_pflops=fam["separate_flops"] / 1e15,
        token_ratio=fam["tokens"] / fam["separate_tokens"],
        flops_ratio=fam["flops"] / fam["separate_flops"],
        seconds_ratio=fam["seconds"] / fam["separate_seconds"],
    )
    affinity = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    data = {
        "benchmark": "lm_nested",
        "command": shlex.join(["taskset", "-c", affinity, ".venv/bin/python", "bench/bench_lm_nested.py", *sys.argv[1:]]),
        **cpu_facts(),
        "corpus": "Debian fortunes 1:1.99.1-7.3, /usr/share/games/fortunes (byte tokens; split by document hash)",
        "load_average_at_end": os.getloadavg()[0],
        "goal": f"each nested width's perplexity within {100 * GOAL_GAP:g} % of the same size alone; family "
        f"tokens <= {GOAL_TOKENS}x the three sizes trained separately",
        "goal_gap_met": all(r["same_tokens_val_gap"] <= GOAL_GAP and r["same_tokens_test_gap"] <= GOAL_GAP
                            for r in rows if "same_tokens_val_gap" in r),  # fmt: skip
        "goal_tokens_met": fam["token_ratio"] <= GOAL_TOKENS,
        "rows": rows,
        "runs": run_costs,
        "family": fam,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    write_results(args.out, data)
    print(markdown(data))


if __name__ == "__main__":
    main()
