"""PSS-Net vs the sandwich supernet over several seeds: per bucket, (a) - (b) for every seed, its
mean and standard error, from the JSON files of ``bench_pss.py`` runs that differ only in
``train.seed``.

One 250-step run moves a supernet's test accuracy by ~3 points from seed to seed (docs/RESULTS.md,
Stage-I seed check), as much as the gaps between the samplers; only the mean over seeds says which
sampler is ahead, and the standard error says whether that can be told apart from zero.

    python bench/summarise_pss.py bench/out/pss.json bench/out/pss_seed1.json ... --out bench/out/pss_seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import mean_se, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="bench_pss.py JSON outputs, one per seed")
    ap.add_argument("--out", default="bench/out/pss_seeds.json")
    args = ap.parse_args()
    if len(args.runs) < 2:
        ap.error("give the outputs of at least two seeds")
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    if any(r.get("quick") for r in runs):
        ap.error("a --quick run is not a benchmark result")
    seeds = [  # written by bench_pss.py since --recipe config; before, only an override named it
        r.get("seed", next((int(o.split("=")[1]) for o in r["overrides"]["pss"] if o.startswith("train.seed=")), 0))
        for r in runs
    ]
    gaps: dict[float, list[float]] = {}
    for r in runs:
        for a, b in zip(r["pss"], r["sandwich"], strict=True):
            gaps.setdefault(a["bucket"], []).append(a["test_accuracy"] - b["test_accuracy"])
    rows = []
    for bucket, g in sorted(gaps.items()):
        if len(g) != len(runs):
            raise SystemExit(f"bucket {bucket:g} is missing from some runs: the runs are not comparable")
        stat = mean_se(g)
        rows.append(
            {"bucket": bucket, "gaps": g, "mean": stat["mean"], "sem": stat["se"], "pss_wins": sum(x >= 0 for x in g)}
        )
    n = len(runs)
    lines = [
        "| bucket (MMACs) | "
        + " | ".join(f"seed {i}" for i in seeds)
        + " | mean +- s.e. | PSS >= sandwich |",
        "| ---: | " + " | ".join("---:" for _ in range(n)) + " | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['bucket']:g} | "
            + " | ".join(f"{x:+.2f}" for x in row["gaps"])
            + f" | {row['mean']:+.2f} +- {row['sem']:.2f} | {row['pss_wins']}/{n} |"
        )
    overall = [x for row in rows for x in row["gaps"]]
    per_seed = [statistics.fmean(row["gaps"][i] for row in rows) for i in range(n)]
    summary = {
        "runs": args.runs,
        "seeds": seeds,
        "rows": rows,
        "mean_gap": statistics.fmean(overall),
        "per_seed_mean_gap": per_seed,
        # buckets of one run move together (the whole supernet trained better or worse), so the
        # independent samples are the seeds: the error of the mean gap is over per-seed means
        "mean_gap_sem_over_seeds": mean_se(per_seed)["se"],
        "buckets_mean_ge_0": sum(row["mean"] >= 0 for row in rows),
        "table": "\n".join(lines),
    }
    print("(a) PSS - (b) sandwich, test top-1 points per bucket:\n")
    print(summary["table"])
    print(
        f"\nmean over buckets and seeds {summary['mean_gap']:+.2f} +- {summary['mean_gap_sem_over_seeds']:.2f} "
        "(s.e. over per-seed means); per seed "
        + ", ".join(f"{x:+.2f}" for x in per_seed)
        + f"; mean >= 0 in {summary['buckets_mean_ge_0']}/{len(rows)} buckets"
    )
    write_results(args.out, summary)


if __name__ == "__main__":
    main()
