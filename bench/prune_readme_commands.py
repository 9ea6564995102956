"""Run the pruning commands that README.md and docs/PRUNING.md show, as written, and record what
each prints (validation top-1, MACs, parameters) and how long it took.

Issue 33: a new user's first pruning command must give a network worth keeping at the preset's
budget. This is that check, one command at a time (they compete for the CPU otherwise), each in
a fresh run directory under ``--runs`` (the commands' relative ``--out`` paths land there), with
``--set train.threads=N`` appended so the figures say how many threads they had. The table in
docs/PRUNING.md ("What the documented commands give") is read from the JSON this writes:

    python bench/prune_readme_commands.py              # -> bench/out/prune_readme_commands.json
    python bench/prune_readme_commands.py --only dcff  # one command (rows of the others are kept)
    python bench/prune_readme_commands.py --table      # the Markdown table, from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_facts, write_results

# name -> the command as README.md / docs/PRUNING.md show it (without the leading `dynaslice`)
COMMANDS = {
    "dcff": "prune dcff --target-macs 0.5 --out runs/dcff",
    "whitebox": "prune whitebox --target-macs 14M --out runs/wb",
    "onexn": "prune onexn --set prune.n=8 --set prune.sparsity=0.5",
    "l1": "prune l1 --target-params 0.5 --out runs/l1",
}


def run_one(command: str, threads: int, cwd: Path) -> dict:
    """Run ``dynaslice COMMAND --set train.threads=THREADS`` in ``cwd``; its output, result and time."""
    tokens = shlex.split(command)
    argv = [sys.executable, "-m", "dynaslice", *tokens, "--set", f"train.threads={threads}"]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    # the CLI's default run directory where the command names none
    out = tokens[tokens.index("--out") + 1] if "--out" in tokens else f"runs/prune-{tokens[1]}"
    final = cwd / out / "final_eval.json"
    row = {
        "command": f"dynaslice {command} --set train.threads={threads}",
        "returncode": proc.returncode,
        "seconds": round(seconds, 1),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # a shared machine: others' work slows it
        "printed": proc.stdout.strip().splitlines(),
        "stderr_tail": proc.stderr.strip().splitlines()[-3:],
    }
    if proc.returncode == 0 and final.exists():
        row["final_eval"] = json.loads(final.read_text())
        row["final_eval"].get("info", {}).pop("scores", None)  # per channel: in the run directory
    return row


def table(data: dict) -> str:
    """The Markdown table of docs/PRUNING.md from this script's JSON."""
    threads = data.get("threads", 2)  # files written before the key was recorded ran with 2
    lines = [
        f"| command (with `--set train.threads={threads}`) | val top-1 (%) | MMACs (nominal) of full | "
        "params (non-zero) | time (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in data["rows"].items():
        r = row.get("final_eval")
        command = f"`dynaslice {COMMANDS[name]}`"
        if r is None:
            lines.append(f"| {command} | failed: {' '.join(row['stderr_tail'])[-80:]} | | | |")
            continue
        lines.append(
            f"| {command} | {r['accuracy']:.2f} | {r['macs'] / 1e6:.2f} ({r['nominal_macs'] / 1e6:.2f}) of "
            f"{r['full_macs'] / 1e6:.2f} | {r['params'] / 1e3:.0f}k ({r['nonzero_params'] / 1e3:.0f}k) | "
            f"{row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only", nargs="+", choices=list(COMMANDS), default=list(COMMANDS), help="commands to run"
    )
    ap.add_argument("--threads", type=int, default=2, help="train.threads of every command")
    ap.add_argument("--runs", default="runs/prune_readme", help="working directory of the commands (emptied)")
    ap.add_argument("--out", default="bench/out/prune_readme_commands.json")
    ap.add_argument(
        "--table", action="store_true", help="print docs/PRUNING.md's table from --out, run nothing"
    )
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return

    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else {}
    for name in args.only:
        cwd = Path(args.runs).resolve() / name
        shutil.rmtree(cwd, ignore_errors=True)  # as written: each command starts in a fresh directory
        cwd.mkdir(parents=True)
        print(f"dynaslice {COMMANDS[name]}", flush=True)
        rows[name] = {**run_one(COMMANDS[name], args.threads, cwd), "date": datetime.date.today().isoformat()}
        said = [line for line in rows[name]["printed"] if "val top-1" in line] or rows[name]["stderr_tail"]
        print(f"  {' | '.join(said)} ({rows[name]['seconds']:.0f} s)", flush=True)
        write_results(out, {"cpu": cpu_facts()["cpu"], "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
