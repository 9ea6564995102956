"""The report of a ``dynaslice run`` directory: ``report.md`` with PNG plots, and ``report.json``.

Reads only what the pipeline's steps wrote (``pipeline.yaml``, ``eval/*.json``, ``latency.json``,
``export/exports.json``, ``done/*.json``), so a report can be rebuilt without touching a model:
``python -c "from dynaslice.report import write_report; write_report('runs/demo')"``.

Plots (matplotlib, Agg backend, so no display is needed):

- ``plots/accuracy_vs_macs.png``: test top-1 against MACs per image for the supernet's uniform
  subnets, the routes run as static subnets, each gated model at its average MACs (labelled with
  its target) and, when the run directory has them (``eval/static.json``), static counterparts;
- ``plots/latency_vs_macs.png``: batch-1 milliseconds per image measured on the machine that ran
  the pipeline (medians of interleaved rounds);
- ``plots/routes_per_class.png``: per class, the share of test images each gated model sends
  down each route.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from . import runs
from .atomic import atomic_write_bytes

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows, as one JSON-serialisable dict (written as ``report.json``)."""
    run_dir = Path(run_dir)
    settings = yaml.safe_load((run_dir / runs.PIPELINE).read_text())
    cfg, run = settings["config"], settings["run"]
    supernet = _load(run_dir / runs.EVAL / "supernet.json")
    if supernet is None:
        raise FileNotFoundError(f"{run_dir / runs.EVAL / 'supernet.json'} is missing: run the eval step first")
    gated = []
    for target in run["gate_targets"]:
        result = _load(run_dir / runs.EVAL / f"{runs.gate_name(target)}.json")
        if result is not None:
            gated.append({"name": runs.gate_name(target), **result})
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
        "latency": _load(run_dir / runs.LATENCY),
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


def plot_latency(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    lat = r["latency"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {
        "uniform": ("o", "tab:blue", "uniform subnets (static)"),
        "route": ("s", "tab:gray", "routes (static)"),
        "gated": ("*", "tab:red", "gated (dynamic, per image)"),
    }
    for kind, (marker, color, label) in styles.items():
        rows = sorted((x for x in lat["rows"] if x["kind"] == kind), key=lambda x: x["macs"])
        if not rows:
            continue
        ax.plot([x["macs"] / 1e6 for x in rows], [x["ms"] for x in rows], marker, color=color, label=label,
                markersize=14 if kind == "gated" else 7, linestyle="-" if kind == "uniform" else "none")  # fmt: skip
        for x in rows:
            if kind != "route":
                ax.annotate(x["name"], (x["macs"] / 1e6, x["ms"]), textcoords="offset points",
                            xytext=(5, -11 if kind == "uniform" else 5), fontsize=8, color=color)  # fmt: skip
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("ms per image (batch 1, median)")
    ax.set_title(f"Latency on this machine ({lat['threads']} thread(s), {lat['repeats']} interleaved rounds)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
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


def _table(r: dict[str, Any]) -> str:
    lat = {x["name"]: x["ms"] for x in (r["latency"] or {}).get("rows", [])}

    def ms(name: str) -> str:
        return f"{lat[name]:.2f}" if name in lat else "-"

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
        "| model | MMACs per image | test top-1 (%) | ms per image (batch 1) | routes taken (narrowest first) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for macs, label, acc, t, hist in sorted(rows, key=lambda row: row[0]):
        lines.append(f"| {label} | {macs / 1e6:.2f} | {acc:.2f} | {t} | {hist} |")
    return "\n".join(lines)


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


def render(r: dict[str, Any]) -> str:
    cut = r["gated"][0]["cut"] if r["gated"] else r["gate"]["cut"]
    lines = [
        f"# dynaslice run: {r['model']} on {r['dataset']}",
        "",
        f"Gated supernet (gate before stage {cut}, {len(r['routes'])} routes), Stage II at targets "
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
        lines += [
            "## Latency vs MACs",
            "",
            f"Measured on the machine that ran the pipeline: batch 1, {r['latency']['threads']} thread(s), "
            f"median of {r['latency']['repeats']} interleaved rounds; a gated model's time is the mean over a "
            "fixed set of test images (its cost depends on the image), plotted at its average MACs on those "
            "images. Static subnets are the plain-PyTorch extracted models.",
            "",
            "![latency vs MACs](plots/latency_vs_macs.png)",
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
    if r["exports"]:
        e = r["exports"]
        lines += [
            "## Exports (`export/`)",
            "",
            f"- `export/gated/`: the gated model of target {e['gated']['target']:g} (best validation accuracy) as an "
            "ONNX package; run it with `dynaslice.runtime.GatedOnnxRunner` (onnxruntime + numpy).",
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
