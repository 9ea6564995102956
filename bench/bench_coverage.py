"""Which networks become supernets? make_supernet beside Torch-Pruning and ModelOpt FastNAS (issue 28).

Every torchvision classification builder and the timm models in ``TIMM`` (random weights,
10 classes, norm statistics randomised, eval mode; nothing is downloaded) go through three tools,
on the same network and the same input (3x64x64 where the model runs on it, else its default
size; each row says which):

- **dynaslice** ``ds.make_supernet(model, x)``: converts, or is refused in one line? The largest
  subnet against the model (relative error, goal <= 1e-5), the narrowest subnet's MACs over the
  model's (goal <= 0.5), the extracted narrowest subnet against its slice (<= 1e-5) and its ONNX
  export on onnxruntime against torch (<= 1e-4; the TorchScript exporter, or where it cannot
  export an op at this input the torch.export-based one: ``onnx_exporter`` says which).
- **Torch-Pruning** (``tp.pruner.MetaPruner``, which builds its DependencyGraph; 50 % of every
  group's channels, the classifier ignored): converts = runs and the pruned model still returns
  [batch, classes]; its MACs ratio.
- **ModelOpt FastNAS** (``mtn.convert(model, mode=[("fastnas", config)])`` with DS-Net's grid):
  converts = no error, >= 1 searchable hparam, and the max subnet equals the model (<= 1e-5).

The peers run in their own environment (``.venv-peers``, pins in bench/peers-constraints.txt:
their dependencies are not the project's). Each tool runs in a worker process
(bench/_coverage_worker.py) that writes one result per model to ``--cache`` as soon as it has it:
a run that is stopped resumes where it was (``--fresh`` starts over), a model over ``--timeout``
is stopped and recorded, and a worker that dies is restarted after the model it died on.
Order: dynaslice on torchvision, then timm, then the peers. The results (every row, the totals
per tool and family, the goals) go to one JSON file::

    python3 -m venv .venv-peers && .venv-peers/bin/pip install -c bench/peers-constraints.txt \\
        torch torchvision timm onnx requests torch-pruning nvidia-modelopt
    python bench/bench_coverage.py --out bench/out/coverage.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torchvision
from common import write_results

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_coverage_worker.py"
TOOLS = ("dynaslice", "torch_pruning", "modelopt")
SUITES = ("torchvision", "timm")

# >= 30 timm networks across families (name: family); all exist in the pinned timm 1.0.31.
TIMM = {
    "resnet18": "resnet", "resnet50": "resnet", "resnet26d": "resnet", "seresnet50": "resnet",
    "resnetv2_50": "resnet", "resnext50_32x4d": "resnext", "res2net50_26w_4s": "res2net",
    "skresnet18": "sknet", "efficientnet_b0": "efficientnet", "efficientnet_lite0": "efficientnet",
    "efficientnetv2_rw_t": "efficientnet", "tinynet_a": "efficientnet",
    "mobilenetv2_100": "mobilenet", "mobilenetv3_small_100": "mobilenetv3",
    "mobilenetv3_large_100": "mobilenetv3", "mobilenetv4_conv_small": "mobilenetv4",
    "lcnet_050": "mobilenetv3", "mnasnet_100": "mnasnet", "fbnetc_100": "mnasnet",
    "ghostnet_100": "ghostnet", "rexnet_100": "rexnet", "mobileone_s0": "mobileone",
    "regnetx_002": "regnet", "regnety_002": "regnet", "regnetz_b16": "regnet",
    "convnext_atto": "convnext", "convnextv2_atto": "convnext",
    "densenet121": "densenet", "dla34": "dla", "dpn68": "dpn", "hrnet_w18_small": "hrnet",
    "cspresnet50": "cspnet", "darknet53": "cspnet", "repvgg_a0": "byobnet", "gernet_s": "byobnet",
    "vgg11": "vgg", "ese_vovnet19b_dw": "vovnet", "hgnetv2_b0": "hgnet", "selecsls42b": "selecsls",
    "inception_v3": "inception", "nf_resnet26": "nfnet",
    "vit_tiny_patch16_224": "vit", "deit_tiny_patch16_224": "deit",
    "deit_tiny_distilled_patch16_224": "deit", "swin_tiny_patch4_window7_224": "swin",
    "mixer_s16_224": "mlp-mixer", "resmlp_12_224": "mlp-mixer",
    "poolformer_s12": "metaformer", "pvt_v2_b0": "pvt", "levit_128s": "levit",
    "mobilevit_xxs": "mobilevit", "edgenext_xx_small": "edgenext", "fastvit_t8": "fastvit",
    "efficientvit_b0": "efficientvit",
}  # fmt: skip

# torchvision's builders by family: the first prefix that a name starts with
TORCHVISION_FAMILIES = (
    "wide_resnet", "resnext", "resnet", "regnet", "efficientnet_v2", "efficientnet", "mobilenet_v2",
    "mobilenet_v3", "mnasnet", "shufflenet_v2", "squeezenet", "densenet", "convnext", "swin_v2",
    "swin", "maxvit", "vit", "vgg", "alexnet", "googlenet", "inception",
)  # fmt: skip


def family(suite: str, name: str) -> str:
    if suite == "timm":
        return TIMM[name]
    return next((f for f in TORCHVISION_FAMILIES if name.startswith(f)), name)


def model_list(suites: list[str]) -> list[str]:
    """``SUITE/NAME`` for every model of the suites, in the order they run."""
    keys = []
    if "torchvision" in suites:
        keys += [f"torchvision/{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    if "timm" in suites:
        keys += [f"timm/{n}" for n in TIMM]
    return keys


def cache_file(cache: Path, tool: str, key: str) -> Path:
    return cache / tool / (key.replace("/", "__") + ".json")


def run_tool(tool: str, python: str, keys: list[str], cache: Path, timeout: int, threads: int) -> None:
    """Run the worker until every key has a result in the cache.

    SIGALRM stops a slow model inside the worker; a worker stuck in one C call past ``timeout``
    + 120 s is killed here, and a worker that dies (killed for memory, a crash) is restarted
    after the model it was on, which is recorded as such.
    """
    env = {**os.environ, "COVERAGE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    while todo := [k for k in keys if not cache_file(cache, tool, k).exists()]:
        print(f"{tool}: {len(todo)} model(s) to go", flush=True)
        argv = [python, str(WORKER), tool, str(cache), str(timeout), *todo]
        proc = subprocess.Popen(argv, env=env, cwd=HERE.parent)
        last, done, killed = time.monotonic(), 0, False
        while proc.poll() is None:
            time.sleep(2)
            now_done = sum(cache_file(cache, tool, k).exists() for k in todo)
            if now_done != done:
                last, done = time.monotonic(), now_done
            elif time.monotonic() - last > timeout + 120:
                proc.kill()
                proc.wait()
                killed = True
        left = [k for k in todo if not cache_file(cache, tool, k).exists()]
        if left:
            key = left[0]
            suite, name = key.split("/", 1)
            if killed:
                status, reason = (
                    "timeout",
                    f"over {timeout} s: killed after {timeout + 120} s without a result",
                )
            else:
                status = "crashed"
                reason = f"the worker died on it (exit code {proc.returncode}: killed for memory, or a crash)"
            row = {"tool": tool, "suite": suite, "model": name, "status": status, "reason": reason}
            path = cache_file(cache, tool, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=1))


# --------------------------------------------------------------------------- summary


def dynaslice_goals(row: dict[str, Any]) -> dict[str, bool]:
    """Which of issue 28's goals one converted model meets."""
    ok = row.get("status") == "converted"
    return {
        "converts": ok,
        "largest_equal": ok and row.get("largest_rel_err", 1.0) <= 1e-5,
        "narrowest_half": ok and row.get("narrowest_macs_ratio", 1.0) <= 0.5,
        "extract_equal": ok and row.get("extract_rel_err", 1.0) <= 1e-5,
        "onnx_equal": ok and row.get("onnx_rel_err", 1.0) <= 1e-4,
    }


def meets(row: dict[str, Any]) -> bool:
    """The headline goal: converts, largest == model and narrowest <= 0.5 of its MACs."""
    g = dynaslice_goals(row)
    return g["largest_equal"] and g["narrowest_half"]


def summarise(rows: list[dict[str, Any]], tools: list[str]) -> dict[str, Any]:
    """Counts per suite and tool, per family, and the goals (from the rows alone)."""
    totals: dict[str, Any] = {}
    for suite in SUITES:
        mine = [r for r in rows if r["suite"] == suite]
        if not mine:
            continue
        t: dict[str, Any] = {"models": len(mine)}
        if "dynaslice" in tools:
            ds_rows = [r["dynaslice"] for r in mine if "dynaslice" in r]
            t["dynaslice"] = {
                "status": dict(Counter(r["status"] for r in ds_rows)),
                **{k: sum(dynaslice_goals(r)[k] for r in ds_rows) for k in dynaslice_goals({})},
                "meets_goal": sum(meets(r) for r in ds_rows),
                "refused_in_one_line": sum(
                    r["status"] == "refused" and r.get("one_line", False) for r in ds_rows
                ),
            }
            t["dynaslice"]["meets_goal_share"] = t["dynaslice"]["meets_goal"] / len(mine)
            ratios = [r["narrowest_macs_ratio"] for r in ds_rows if "narrowest_macs_ratio" in r]
            t["dynaslice"]["median_narrowest_macs_ratio"] = statistics.median(ratios) if ratios else None
        for tool in tools:
            if tool == "dynaslice":
                continue
            peer = [r[tool] for r in mine if tool in r]
            t[tool] = {
                "status": dict(Counter(r["status"] for r in peer)),
                "converts": sum(r["status"] == "converted" for r in peer),
                "converts_share": sum(r["status"] == "converted" for r in peer) / len(mine),
                "narrowest_half": sum(
                    r["status"] == "converted"
                    and r.get("pruned_macs_ratio", r.get("narrowest_macs_ratio", 1.0)) <= 0.5
                    for r in peer
                ),
            }
        families: dict[str, dict[str, int]] = {}
        for r in mine:
            f = families.setdefault(r["family"], {"models": 0})
            f["models"] += 1
            if "dynaslice" in r:
                f["dynaslice"] = f.get("dynaslice", 0) + meets(r["dynaslice"])
            for tool in tools:
                if tool != "dynaslice" and tool in r:
                    f[tool] = f.get(tool, 0) + (r[tool]["status"] == "converted")
        t["families"] = families
        totals[suite] = t
    converted = [r["dynaslice"] for r in rows if r.get("dynaslice", {}).get("status") == "converted"]
    goals = {}
    for suite, t in totals.items():
        if "dynaslice" in t:
            goals[f"{suite}: >= 95% convert with largest == model and narrowest <= 0.5 MACs"] = (
                t["dynaslice"]["meets_goal_share"] >= 0.95
            )
            for tool in tools:
                if tool != "dynaslice" and tool in t:
                    goals[f"{suite}: more models than {tool}"] = (
                        t["dynaslice"]["meets_goal"] > t[tool]["converts"]
                    )
    if "dynaslice" in tools:
        ds_rows = [r["dynaslice"] for r in rows if "dynaslice" in r]
        goals["every model that does not convert is refused in one line"] = all(
            r["status"] in ("converted", "refused") and (r["status"] == "converted" or r.get("one_line"))
            for r in ds_rows
        )
        goals["every converted model: extracted == slice (1e-5)"] = all(
            dynaslice_goals(r)["extract_equal"] for r in converted
        )
        goals["every converted model: ONNX == torch (1e-4)"] = all(
            dynaslice_goals(r)["onnx_equal"] for r in converted
        )
    return {"totals": totals, "goals": goals}


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """dynaslice's to-do: each model that misses a goal, with its one-line reason."""
    out = []
    for r in rows:
        d = r.get("dynaslice")
        if d is None:
            continue
        goals = dynaslice_goals(d)
        if d["status"] != "converted":
            if d["status"] == "refused" and d.get("one_line"):
                why = f"refused: {d['reason']}"
            else:  # not a clean refusal: an error, a timeout, a crash, or a refusal over several lines
                why = f"{d['status']} (not a one-line refusal): {d.get('reason', '')}"
        elif not goals["largest_equal"]:
            why = d.get("largest_error") or f"largest differs from the model ({d['largest_rel_err']:.2g})"
        elif not goals["narrowest_half"]:
            ratio = d.get("narrowest_macs_ratio")
            why = (
                d.get("count_error")
                or d.get("extract_error")
                or (f"narrowest at {ratio:.2f} of the MACs ({d.get('kept_note') or 'groups kept whole'})")
            )
        elif not goals["extract_equal"]:
            why = d.get("extract_error") or f"extracted differs from its slice ({d['extract_rel_err']:.2g})"
        elif not goals["onnx_equal"]:
            error = d.get("onnx_error")
            why = f"ONNX: {error}" if error else f"ONNX differs from torch ({d['onnx_rel_err']:.2g})"
        else:
            continue
        out.append(f"{r['suite']}/{r['model']}: {why.splitlines()[0] if why else why}")
    return out


TOOL_NAMES = {"dynaslice": "dynaslice", "torch_pruning": "Torch-Pruning", "modelopt": "ModelOpt FastNAS"}


def markdown(data: dict[str, Any]) -> str:
    """The tables of docs/RESULTS.md's coverage section, from a result of this script."""
    totals, tools = data["totals"], data["tools"]
    peers = [t for t in tools if t != "dynaslice"]
    lines = []
    if "dynaslice" in tools:
        head = "| suite | models | converts | largest == model | narrowest <= 0.5 MACs | both (share) "
        head += "| median narrowest MACs | extracted == slice | ONNX == torch | refused in one line |"
        lines += [head, "| --- " + "| ---: " * 9 + "|"]
        for suite, t in totals.items():
            d = t["dynaslice"]
            median = d["median_narrowest_macs_ratio"]
            lines.append(
                f"| {suite} | {t['models']} | {d['converts']} | {d['largest_equal']} | {d['narrowest_half']} "
                f"| {d['meets_goal']} ({100 * d['meets_goal_share']:.1f}%) "
                f"| {'' if median is None else f'{median:.3f}'} | {d['extract_equal']} | {d['onnx_equal']} "
                f"| {d['refused_in_one_line']} |"
            )
        lines.append("")
    if peers:
        head = "| suite | models | dynaslice (largest == model, narrowest <= 0.5) |"
        head += "".join(f" {TOOL_NAMES[p]} converts | {TOOL_NAMES[p]} at <= 0.5 MACs |" for p in peers)
        lines += [head, "| --- " + "| ---: " * (2 + 2 * len(peers)) + "|"]
        for suite, t in totals.items():
            cells = [suite, str(t["models"]), str(t["dynaslice"]["meets_goal"]) if "dynaslice" in t else ""]
            for p in peers:
                cells += [
                    f"{t[p]['converts']} ({100 * t[p]['converts_share']:.1f}%)",
                    str(t[p]["narrowest_half"]),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for suite, t in totals.items():
        lines += [f"| {suite} family | models | " + " | ".join(TOOL_NAMES[x] for x in tools) + " |"]
        lines += ["| --- " + "| ---: " * (1 + len(tools)) + "|"]
        for fam, f in sorted(t["families"].items()):
            lines.append(f"| {fam} | {f['models']} | " + " | ".join(str(f.get(x, 0)) for x in tools) + " |")
        lines.append("")
    groups: dict[str, list[str]] = {}
    for failure in data["dynaslice_failures"]:
        category, detail = failure_category(failure)
        model = failure.split(":", 1)[0]
        groups.setdefault(category, []).append(f"{model} ({detail})" if detail else model)
    for category, models in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- **{category}** ({len(models)}): " + ", ".join(models))
    return "\n".join(lines)


# dynaslice's refusals by kind, for the docs (coverage.json keeps each one-line reason whole)
CATEGORIES = (
    (
        "runs different code in training and in eval mode",
        "train/eval-dependent code outside torch.nn layers",
        None,
    ),
    ("reads parameter", "a parameter read outside a layer", r"reads parameter '([^']+)'"),
    ("cannot trace", "not traceable by torch.fx", r"in (.+?): TraceError"),
    ("forward takes", "forward takes several inputs", r"takes (\d+) inputs"),
    ("narrowest at", "converts, but its narrowest subnet keeps over half the MACs", r"narrowest at ([\d.]+)"),
    ("found no channels", "no channel group it can slice", r"first op it cannot follow: (.*?)\)?$"),
    ("ONNX", "ONNX export", r"ONNX: (\w+Error)"),
)


def failure_category(failure: str) -> tuple[str, str]:
    """(kind, the model's own detail) of one line of ``dynaslice_failures``."""
    for needle, category, detail in CATEGORIES:
        if needle in failure:
            found = re.search(detail, failure) if detail else None
            return category, found.group(1) if found else ""
    return "other", failure.split(": ", 1)[1]


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        )
        return head.stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default="torchvision,timm", help="torchvision, timm (comma-separated)")
    p.add_argument("--tools", default=",".join(TOOLS), help="dynaslice, torch_pruning, modelopt")
    p.add_argument(
        "--models", default="", help="only these SUITE/NAME (comma-separated), e.g. torchvision/resnet18"
    )
    p.add_argument("--timeout", type=int, default=300, help="seconds per model and tool (default 300)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the workers (default 1)")
    p.add_argument("--peers-python", default=".venv-peers/bin/python", help="the peers' environment's Python")
    p.add_argument("--cache", default="bench/out/coverage-cache", help="one result per model and tool")
    p.add_argument("--fresh", action="store_true", help="measure again what the cache holds for these models")
    p.add_argument("--out", default="bench/out/coverage.json")
    args = p.parse_args()
    suites, tools = args.suites.split(","), args.tools.split(",")
    if bad := [s for s in suites if s not in SUITES]:
        p.error(f"unknown suite {bad[0]!r}; choose from {', '.join(SUITES)}")
    if bad := [t for t in tools if t not in TOOLS]:
        p.error(f"unknown tool {bad[0]!r}; choose from {', '.join(TOOLS)}")
    if args.timeout <= 0 or args.threads <= 0:
        p.error("--timeout and --threads must be positive")
    keys = model_list(suites)
    if args.models:
        wanted = args.models.split(",")
        if bad := [k for k in wanted if k not in keys]:
            p.error(f"unknown model {bad[0]!r}; give SUITE/NAME from --suites, e.g. torchvision/resnet18")
        keys = wanted
    peers = [t for t in tools if t != "dynaslice"]
    if peers and not Path(args.peers_python).exists():
        p.error(
            f"{args.peers_python} not found: create the peers' environment (see --help) or leave out {peers}"
        )

    cache = Path(args.cache)
    if args.fresh:
        for tool in tools:
            for key in keys:
                cache_file(cache, tool, key).unlink(missing_ok=True)
    for tool in tools:  # dynaslice first, each on torchvision then timm (the order of keys)
        python = sys.executable if tool == "dynaslice" else args.peers_python
        run_tool(tool, python, keys, cache, args.timeout, args.threads)

    rows = []
    for key in keys:
        suite, name = key.split("/", 1)
        row: dict[str, Any] = {"suite": suite, "model": name, "family": family(suite, name)}
        for tool in tools:
            result = json.loads(cache_file(cache, tool, key).read_text())
            row["input_size"] = row.get("input_size") or result.get("input_size")
            row[tool] = {k: v for k, v in result.items() if k not in ("tool", "suite", "model", "input_size")}
        rows.append(row)
    summary = summarise(rows, tools)
    data = {
        "command": "python bench/bench_coverage.py " + " ".join(sys.argv[1:]),
        "commit": git_commit(),
        "tools": tools,
        "worker_threads": args.threads,  # the workers' torch threads ("environment" is this process's)
        # which engine measured the dynaslice rows (a long run may span commits of the engine)
        "engine_states": dict(
            Counter(
                f"{e['commit']} {e['engine_sha1']}" if (e := r["dynaslice"].get("engine")) else "not recorded"
                for r in rows
                if "dynaslice" in r
            )
        ),
        "versions": {
            "dynaslice": versions(sys.executable),
            **({"peers": versions(args.peers_python)} if peers else {}),
        },
        **summary,
        "dynaslice_failures": failures(rows) if "dynaslice" in tools else [],
        "rows": rows,
    }
    write_results(args.out, data)
    print(markdown(data))
    for suite, t in summary["totals"].items():
        line = [f"{suite}: {t['models']} models"]
        if "dynaslice" in t:
            line.append(f"dynaslice meets the goal on {t['dynaslice']['meets_goal']}")
        line += [f"{tool} converts {t[tool]['converts']}" for tool in peers if tool in t]
        print(", ".join(line))
    for goal, met in summary["goals"].items():
        print(f"{'met   ' if met else 'MISSED'} {goal}")


def versions(python: str) -> dict[str, str]:
    """Package versions in one environment (the project's or the peers'), as it reports them."""
    code = (
        "import json, importlib.metadata as m\n"
        "def v(p):\n"
        "    try:\n"
        "        return m.version(p)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "names = ('torch', 'torchvision', 'timm', 'onnxruntime', 'torch-pruning', 'nvidia-modelopt')\n"
        "print(json.dumps({p: v(p) for p in names if v(p)}))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr.strip()[-300:]}


if __name__ == "__main__":
    main()
