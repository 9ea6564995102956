"""The report of a ``dynaslice run`` directory: ``report.md`` with PNG plots, and ``report.json``.

Reads only what the pipeline's steps wrote (``pipeline.yaml``, ``eval/*.json``, ``latency.json``,
``export/exports.json``, ``done/*.json``), so a report can be rebuilt without touching a model:
``python -c "from dynaslice.report import write_report; write_report('runs/demo')"``.

Plots (matplotlib, Agg backend, so no display is needed):

- ``plots/accuracy_vs_macs.png``: test top-1 against MACs per image for the supernet's uniform
  subnets, the routes run as static subnets, each gated model at its average MACs (labelled with
  its target) and, when the run directory has them (``eval/static.json``), static counterparts;
- ``plots/latency_vs_macs.png``: batch-1 milliseconds per image measured on the machine that ran
  the pipeline (medians of interleaved rounds, bars from the fastest to the slowest round), on a
  log axis: the deployment runtime is often 10x faster than eager, and a busy machine's rounds
  span 100x -- on a linear axis both squash the fast points onto zero;
- ``plots/routes_per_class.png``: per class, the share of test images each gated model sends
  down each route.

Latency rows are flagged *noisy* when their rounds spread too much (:func:`spread`,
:data:`NOISY_SPREAD`): times measured while the machine was busy are reported, never silently.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import runs
from .atomic import atomic_write_bytes
from .config_base import load_yaml

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


NOISY_SPREAD = 1.5
"""A latency row is *noisy* when the slowest quarter of its rounds took more than this many times
the fastest quarter (the ratio of the upper to the lower quartile). On a quiet machine rounds of
one model differ by a few per cent; a busy one (a second job on the cores) stretches some rounds
by 2-200x, and a median over 10 rounds then no longer says what the code costs."""


def spread(ms_all: Sequence[float]) -> dict[str, float | bool]:
    """Summary of one row's rounds: min, quartiles, median, max, ``spread`` (upper / lower
    quartile) and ``noisy`` (``spread > NOISY_SPREAD``)."""
    xs = sorted(float(v) for v in ms_all)
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    ratio = q3 / q1 if q1 > 0 else float("inf")
    return {"min": xs[0], "q1": q1, "median": med, "q3": q3, "max": xs[-1], "spread": ratio,
            "noisy": ratio > NOISY_SPREAD}  # fmt: skip


def unused_routes(gated: dict[str, Any]) -> list[int]:
    """The routes a gated model sent no evaluated image to."""
    return [i for i, count in enumerate(gated["histogram"]) if count == 0]


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _with_spread(lat: dict[str, Any] | None) -> dict[str, Any] | None:
    """``latency.json`` with each row's :func:`spread` (rows without rounds are left as they are)."""
    if not lat:
        return lat
    rows = [{**row, **spread(row["ms_all"])} if row.get("ms_all") else row for row in lat["rows"]]
    return {**lat, "rows": rows, "noisy_spread": NOISY_SPREAD}


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows, as one JSON-serialisable dict (written as ``report.json``)."""
    run_dir = Path(run_dir)
    settings = load_yaml((run_dir / runs.PIPELINE).read_text(encoding="utf-8"), str(run_dir / runs.PIPELINE))
    cfg, run = settings["config"], settings["run"]
    supernet = _load(run_dir / runs.EVAL / "supernet.json")
    if supernet is None:
        raise FileNotFoundError(f"{run_dir / runs.EVAL / 'supernet.json'} is missing: run the eval step first")
    gated = []
    for target in run["gate_targets"]:
        result = _load(run_dir / runs.EVAL / f"{runs.gate_name(target)}.json")
        if result is not None:
            gated.append({"name": runs.gate_name(target), **result})
    for g in gated:
        g["unused_routes"] = unused_routes(g)
    routes = gated[0]["routes"] if gated else []
    data = cfg["data"]
    classes = FASHION_MNIST_CLASSES if data["name"] == "fashion_mnist" else None
    steps = {p.stem: _load(p)["seconds"] for p in sorted((run_dir / runs.DONE).glob("*.json"))}
    return {
        "run_dir": str(run_dir),
        "model": cfg["model"]["name"],
        "dataset": data["name"],
        "test_images": supernet["images"],
        "gate": cfg["model"]["gate"],
        "gate_targets": run["gate_targets"],
        "supernet": supernet["rows"],
        "routes": [{k: r[k] for k in ("name", "arch", "macs", "accuracy")} for r in routes],
        "gated": gated,
        "static": (_load(run_dir / runs.EVAL / "static.json") or {}).get("rows", []),
        "latency": _with_spread(_load(run_dir / runs.LATENCY)),
        "exports": _load(run_dir / runs.EXPORT / "exports.json"),
        "class_names": classes,
        "step_seconds": steps,
    }


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def plot_accuracy(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sup = sorted(r["supernet"], key=lambda row: row["macs"])
    ax.plot([s["macs"] / 1e6 for s in sup], [s["accuracy"] for s in sup], "o-", color="tab:blue",
            label="supernet, uniform subnets")  # fmt: skip
    for s in sup:
        ax.annotate(s["name"], (s["macs"] / 1e6, s["accuracy"]), textcoords="offset points",
                    xytext=(4, -11), fontsize=8, color="tab:blue")  # fmt: skip
    if r["routes"]:
        ax.plot([x["macs"] / 1e6 for x in r["routes"]], [x["accuracy"] for x in r["routes"]], "s--",
                color="tab:gray", label="routes as static subnets")  # fmt: skip
    if r["static"]:
        st = sorted(r["static"], key=lambda row: row["macs"])
        ax.plot([s["macs"] / 1e6 for s in st], [s["accuracy"] for s in st], "^:", color="tab:green",
                label="static networks trained alone")  # fmt: skip
    for g in r["gated"]:
        ax.plot(g["avg_macs"] / 1e6, g["accuracy"], "*", markersize=15, color="tab:red",
                label="gated (average MACs)" if g is r["gated"][0] else None)  # fmt: skip
        ax.annotate(f"target {g['target']:g}", (g["avg_macs"] / 1e6, g["accuracy"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=9, color="tab:red")  # fmt: skip
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"{r['model']} on {r['dataset']}: accuracy vs compute ({r['test_images']} test images)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    _save(fig, path)
    plt.close(fig)


def _latency_rows(lat: dict[str, Any] | None, runtime: str | None = None, batch: int = 1) -> list[dict[str, Any]]:
    """The latency rows of one runtime and batch size (files of dynaslice 0.1: eager, batch 1)."""
    if not lat:
        return []
    runtime = runtime or lat.get("deployment", "eager")
    return [x for x in lat["rows"] if x.get("runtime", "eager") == runtime and x.get("batch", 1) == batch]


def plot_latency(r: dict[str, Any], path: Path) -> None:
    """ms per image against MACs at batch 1: the deployment runtime (solid) next to eager (faint)."""
    plt = _plt()
    lat = r["latency"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {
        "uniform": ("o", "tab:blue", "uniform subnets (static)"),
        "route": ("s", "tab:gray", "routes (static)"),
        "gated": ("*", "tab:red", "gated (dynamic, per image)"),
    }
    deploy = lat.get("deployment", "eager")
    for runtime, alpha in dict.fromkeys([("eager", 0.35), (deploy, 1.0)]):
        for kind, (marker, color, label) in styles.items():
            rows = sorted((x for x in _latency_rows(lat, runtime) if x["kind"] == kind), key=lambda x: x["macs"])
            if not rows:
                continue
            ax.plot([x["macs"] / 1e6 for x in rows], [x["ms"] for x in rows], marker, color=color, alpha=alpha,
                    label=f"{label}, {runtime}", markersize=14 if kind == "gated" else 7,
                    linestyle="-" if kind == "uniform" else "none")  # fmt: skip
            ranged = [x for x in rows if "min" in x]  # the fastest to the slowest round
            ax.vlines([x["macs"] / 1e6 for x in ranged], [x["min"] for x in ranged],
                      [x["max"] for x in ranged], color=color, alpha=alpha * 0.6, linewidth=1)  # fmt: skip
            for x in rows if runtime == deploy else []:
                if kind != "route":
                    ax.annotate(x["name"], (x["macs"] / 1e6, x["ms"]), textcoords="offset points",
                                xytext=(5, -11 if kind == "uniform" else 5), fontsize=8, color=color)  # fmt: skip
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("ms per image (batch 1; median, bar: min..max round)")
    ax.set_title(f"Latency here: {deploy} (solid) vs eager PyTorch (faint); {lat['threads']} thread(s)")
    ax.set_yscale("log")  # runtimes 10x apart and noisy rounds stay readable
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    _save(fig, path)
    plt.close(fig)


def plot_routes(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    gated = r["gated"]
    n_routes = len(r["routes"])
    classes = list(gated[0]["per_class"])
    names = r["class_names"] if r["class_names"] and len(r["class_names"]) == len(classes) else classes
    fig, axes = plt.subplots(1, len(gated), figsize=(4.2 * len(gated) + 1.2, 0.35 * len(classes) + 1.6),
                             sharey=True, squeeze=False)  # fmt: skip
    colors = plt.cm.viridis([i / max(1, n_routes - 1) for i in range(n_routes)])
    for ax, g in zip(axes[0], gated, strict=True):
        left = [0.0] * len(classes)
        for i in range(n_routes):
            share = []
            for c in classes:
                counts = g["per_class"][c]
                share.append(100.0 * counts[i] / max(1, sum(counts)))
            mmacs = r["routes"][i]["macs"] / 1e6
            ax.barh(names, share, left=left, color=colors[i], label=f"route{i} ({mmacs:.1f} MMACs)")
            left = [a + b for a, b in zip(left, share, strict=True)]
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of the class's test images")
        ax.set_title(
            f"target {g['target']:g}: {g['avg_macs'] / 1e6:.1f} MMACs, {g['accuracy']:.1f}%", fontsize=10
        )
    axes[0][0].invert_yaxis()  # first class on top (the axes share y: invert once)
    axes[0][-1].legend(
        loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, title="route (narrowest first)"
    )
    fig.suptitle("Routes chosen by the gate, per class")
    _save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- Markdown


def _ms(row: dict[str, Any], digits: int = 2) -> str:
    """A latency cell: the median, the range of rounds, and the noisy flag."""
    text = f"{row['ms']:.{digits}f}"
    if "min" in row:
        text += f" ({row['min']:.{digits}f}-{row['max']:.{digits}f})"
    return text + (" **noisy**" if row.get("noisy") else "")


def _table(r: dict[str, Any]) -> str:
    deploy = (r["latency"] or {}).get("deployment", "eager")
    lat = {x["name"]: x for x in _latency_rows(r["latency"], deploy)}

    def ms(name: str) -> str:
        return _ms(lat[name]) if name in lat else "-"

    rows = [(s["macs"], f"supernet {s['name']}", s["accuracy"], ms(s["name"]), "") for s in r["supernet"]]
    rows += [(x["macs"], f"{x['name']} (static)", x["accuracy"], ms(x["name"]), "") for x in r["routes"]]
    rows += [(s["macs"], f"static {s['name']} trained alone", s["accuracy"], "-", "") for s in r["static"]]
    rows += [
        (
            g["avg_macs"],
            f"**gated, target {g['target']:g}**",
            g["accuracy"],
            ms(g["name"]),
            str(g["histogram"]),
        )
        for g in r["gated"]
    ]
    lines = [
        f"| model | MMACs per image | test top-1 (%) | ms per image (batch 1, {deploy}; median (min-max)) "
        "| routes taken (narrowest first) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for macs, label, acc, t, hist in sorted(rows, key=lambda row: row[0]):
        lines.append(f"| {label} | {macs / 1e6:.2f} | {acc:.2f} | {t} | {hist} |")
    return "\n".join(lines)


def _speed_table(lat: dict[str, Any]) -> str:
    """Per runtime and batch size: the widest and narrowest uniform subnets, the speed-up between
    them against their MAC ratio, and the fastest runtime."""
    lines = ["| runtime | batch | widest ms/image (min-max) | narrowest ms/image (min-max) | speed-up "
             "| MAC ratio | efficiency |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    best: dict[int, tuple[float, str]] = {}
    for rt in lat.get("runtimes", ["eager"]):
        for b in lat.get("batch_sizes", [1]):
            uni = sorted((x for x in _latency_rows(lat, rt, b) if x["kind"] == "uniform"), key=lambda x: x["macs"])
            if len(uni) < 2:
                continue
            lo, hi = uni[0], uni[-1]
            speed, ratio = hi["ms"] / lo["ms"], hi["macs"] / lo["macs"]
            cells = f"{_ms(hi, 3)} | {_ms(lo, 3)} | {speed:.2f}x | {ratio:.2f}x | {speed / ratio:.2f}"
            lines.append(f"| {rt} | {b} | {cells} |")
            best[b] = min(best.get(b, (float("inf"), "")), (hi["ms"], rt))
    fastest = ", ".join(f"{rt} at batch {b}" for b, (_, rt) in sorted(best.items()))
    return "\n".join(lines) + (f"\n\nFastest here (widest subnet): {fastest}." if best else "")


def _per_class(r: dict[str, Any], g: dict[str, Any]) -> str:
    n = len(r["routes"])
    names = r["class_names"]
    lines = [
        "| class | " + " | ".join(f"route{i}" for i in range(n)) + " | avg MMACs |",
        "| --- | " + " | ".join("---:" for _ in range(n)) + " | ---: |",
    ]
    for c, counts in g["per_class"].items():
        label = names[int(c)] if names and int(c) < len(names) else c
        total = max(1, sum(counts))
        avg = sum(k * x["macs"] for k, x in zip(counts, r["routes"], strict=True)) / total / 1e6
        lines.append(f"| {label} | " + " | ".join(str(k) for k in counts) + f" | {avg:.2f} |")
    return "\n".join(lines)


def _routes_used(r: dict[str, Any]) -> str:
    """``4 routes`` -- or, when the gates leave some unused, which ones and how many are used."""
    n = len(r["routes"]) if r["routes"] else r["gate"]["routes"]
    if not r["gated"]:
        return f"{n} routes"
    never = sorted(set.intersection(*(set(g["unused_routes"]) for g in r["gated"])))
    if not never:
        return f"{n} routes"
    names = ", ".join(f"route{i}" for i in never)
    which = "the gate sends" if len(r["gated"]) == 1 else "no gate sends"
    verb = "no" if len(r["gated"]) == 1 else "any"
    used = n - len(never)
    are = "is" if used == 1 else "are"
    return f"{n} routes, of which {used} {are} used: {which} {verb} test image to {names}"


def _latency_text(lat: dict[str, Any]) -> list[str]:
    rows = [x for x in lat["rows"] if "noisy" in x]
    noisy = [x for x in rows if x["noisy"]]
    images = lat.get("images")
    how = (
        f"every model runs the same {images} test images one at a time at batch 1 (a gated model's cost "
        "depends on the image), and one batch at the large size; a row is the median over rounds of the "
        "time per image, the same statistic for every row; the range is the fastest to the slowest round"
        if images
        else "a gated model's batch-1 time is the mean over a fixed set of test images (its cost depends on "
        "the image), a static one's the median of single calls (an older latency.json: rows do not compare)"
    )
    text = [
        f"Measured on the machine that ran the pipeline: {lat['threads']} thread(s), {lat['repeats']} "
        f"interleaved rounds, in eager PyTorch and in the deployment runtime (`{lat.get('deployment', 'eager')}`, "
        f"what `dynaslice.serve.load` picks here); {how}. Gated models are plotted at their average MACs on "
        "those images.",
        "",
    ]
    if noisy:
        text += [
            f"**Warning: {len(noisy)} of {len(rows)} latency rows are noisy** (marked below: the slowest "
            f"quarter of their rounds took over {NOISY_SPREAD:g}x the fastest quarter): the machine was busy "
            "while they were timed, so their times say more about the load than about the models. Time again "
            "on a quiet machine (delete `done/latency.json` and `done/report.json`, then run the same command).",
            "",
        ]
    return text


def render(r: dict[str, Any]) -> str:
    cut = r["gated"][0]["cut"] if r["gated"] else r["gate"]["cut"]
    where = f"at the output of {cut}" if isinstance(cut, str) else f"before stage {cut}"  # str: a module path
    lines = [
        f"# dynaslice run: {r['model']} on {r['dataset']}",
        "",
        f"Gated supernet (gate {where}, {_routes_used(r)}), Stage II at targets "
        f"{', '.join(f'{t:g}' for t in r['gate_targets'])} of the widest route's MACs. Test split: "
        f"{r['test_images']} images. BN statistics recalibrated (uniform subnets: for the uniform widths; "
        "routes and gated models: for the routes).",
        "",
        "## Accuracy vs MACs",
        "",
        "![accuracy vs MACs](plots/accuracy_vs_macs.png)",
        "",
        _table(r),
        "",
    ]
    if not r["static"]:
        lines += ["(No static counterparts trained alone in this run directory, so none are shown.)", ""]
    if r["latency"]:
        lat = r["latency"]
        lines += [
            "## Latency vs MACs",
            "",
            *_latency_text(lat),
            "![latency vs MACs](plots/latency_vs_macs.png)",
            "",
            _speed_table(lat),
            "",
        ]
    if r["gated"]:
        lines += ["## Routes per class", "", "![routes per class](plots/routes_per_class.png)", ""]
        for g in r["gated"]:
            val = g.get("val_accuracy")
            val_text = f", validation top-1 {val:.2f}%" if val is not None else ""
            lines += [
                f"### {g['name']}: {g['avg_macs'] / 1e6:.2f} MMACs on average, test top-1 {g['accuracy']:.2f}%{val_text}",
                "",
                _per_class(r, g),
                "",
                f"SGS agreement (gate route == SGS target): {g['sgs']['agreement']:.1f}%",
                "",
            ]
            if g["unused_routes"]:
                names = ", ".join(f"route{i}" for i in g["unused_routes"])
                lines += [f"No test image goes down {names}: this gate uses "
                          f"{len(g['histogram']) - len(g['unused_routes'])} of its {len(g['histogram'])} routes.",
                          ""]  # fmt: skip
    if r["exports"]:
        e = r["exports"]
        lines += [
            "## Exports (`export/`)",
            "",
            f"- `export/gated/`: the gated model of target {e['gated']['target']:g} (best validation accuracy) as an "
            "ONNX package; run it with `dynaslice.onnx_package.GatedOnnxRunner` (onnxruntime + numpy).",
            "- `export/largest.pt` / `export/largest.onnx` and `export/smallest.pt` / `export/smallest.onnx`: the "
            "widest and narrowest routes as static models. Load a `.pt` without dynaslice with "
            "`torch.load(path, weights_only=False)` (a pickled `torch.fx.GraphModule`); the ONNX files take "
            "`input [batch, C, H, W]` normalised with the mean/std in `export/exports.json`.",
            "",
        ]
    lines += [
        "## Steps",
        "",
        "| step | seconds |",
        "| --- | ---: |",
        *(f"| {k} | {v:.1f} |" for k, v in r["step_seconds"].items()),
        "",
        "Numbers: `report.json`.",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.json`` and ``plots/*.png`` into ``run_dir``; returns report.md."""
    run_dir = Path(run_dir)
    r = collect(run_dir)
    plots = run_dir / "plots"
    plot_accuracy(r, plots / "accuracy_vs_macs.png")
    if r["latency"]:
        plot_latency(r, plots / "latency_vs_macs.png")
    if r["gated"]:
        plot_routes(r, plots / "routes_per_class.png")
    atomic_write_bytes(run_dir / "report.json", (json.dumps(r, indent=1) + "\n").encode())
    atomic_write_bytes(run_dir / "report.md", render(r).encode())
    return run_dir / "report.md"
