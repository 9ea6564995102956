"""Record a finished ``make demo`` run in bench/out: its report.json, how long it took, and where.

docs/RESULTS.md "The main job" quotes the demo's accuracies, MACs, latencies and times; they live
in the run directory (``runs/demo/report.json``, which holds every step's seconds), which is not
kept, so this copies them into bench/out with the facts that make them mean something: the
machine (CPU model and count, torch, threads), the commit, and the wall time of the whole
``time make demo`` from a fresh clone (set-up included), which only the shell that ran it knows.

What is deterministic, and where: the same command on the same machine gives the same
accuracies to the last digit (seeded, bit-exact resume); another CPU's float kernels differ in
the last bits and training grows that into visible differences (a fresh clone on another 2-core
machine gave 90.27 / 89.02 for the widest / narrowest route against 90.72 / 89.51), and times
are this machine's under its load. The record says so, so that a figure read from it is not
mistaken for a constant.

    git clone <repo> && cd <repo> && time make demo     # on a quiet machine; note real and set-up time
    python bench/record_demo.py runs/demo --wall-seconds 688 --setup-seconds 77 --out bench/out/demo.json

Nothing is run or timed here; it reads the run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import cpu_facts, write_results

DETERMINISM = (
    "accuracies: identical to the last digit when the same command runs again on this machine "
    "(seeded, bit-exact resume); on another CPU float kernels differ in the last bits and the "
    "accuracies move by tenths of a point. Times: this machine, under its load at the time."
)


def cpu() -> dict[str, Any]:
    """The CPU the run trained on: model name (Linux) and the cores this process may use."""
    model = cpu_facts()["cpu"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "os": platform.platform()}


def commit() -> str | None:
    """The checkout's commit (None outside a git checkout): which code the figures are of."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def record(
    run_dir: Path, wall_seconds: float | None, setup_seconds: float | None, note: str | None = None
) -> dict[str, Any]:
    """The record of one demo run directory (its report.json must exist: the report step ran)."""
    report_file = run_dir / "report.json"
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{report_file}: not a finished demo run ({type(e).__name__}: {e})") from None
    steps = report.get("step_seconds") or {}
    return {
        "run_dir": str(run_dir),
        "commit": commit(),
        "cpu": cpu(),  # torch, threads and python: "environment", as in every results file
        "wall_seconds": wall_seconds,  # `time make demo` from a fresh clone, set-up included
        "setup_seconds": setup_seconds,
        "run_seconds": sum(steps.values()) if steps else None,  # the steps of `dynaslice run`
        "deterministic": DETERMINISM,
        "note": note,  # how it was run, when not from a fresh clone
        "report": report,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="the demo's run directory (runs/demo)")
    ap.add_argument("--wall-seconds", type=float, default=None, help="real time of `time make demo`")
    ap.add_argument("--setup-seconds", type=float, default=None, help="of which set-up (venv, dependencies)")
    ap.add_argument("--out", default="bench/out/demo.json")
    ap.add_argument("--note", default=None, help="how it was run (e.g. set-up already done, not a fresh clone)")
    args = ap.parse_args(argv)
    for flag in ("wall_seconds", "setup_seconds"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be > 0 seconds")
    write_results(args.out, record(args.run_dir, args.wall_seconds, args.setup_seconds, args.note))


if __name__ == "__main__":
    sys.exit(main())
