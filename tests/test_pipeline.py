"""``dynaslice run`` end to end on tiny synthetic data (stop after Stage I, continue, re-run = all
skipped), its report and exports, and ``dynaslice export`` (ONNX == PyTorch, plain-torch loading,
one-line errors)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dynaslice.cli import main
from dynaslice.dynamic import DynamicNet
from dynaslice.train import latest_checkpoint, load_supernet

CONFIG = {
    "model": {"name": "resnet_small", "kwargs": {"input_size": 12}, "gate": {"enabled": True, "routes": 3}},
    "data": {
        "name": "synthetic",
        "image_size": 12,
        "synthetic_train": 256,
        "synthetic_test": 64,
        "val_size": 64,
        "batch_size": 64,
    },
    "optim": {"lr": 0.2},
    "train": {
        "epochs": 1,
        "eval_every_epochs": 0,
        "eval_widths": [0.5, 1.0],
        "recal_images": 64,
        "recal_batch_size": 64,
    },
    "stage2": {"epochs": 1},
    "run": {"gate_targets": [0.9], "latency_repeats": 2, "latency_images": 2},
}
STEPS = ["stage1", "recalibrate", "gate-t0.9", "eval", "export", "latency", "report"]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
    """Run through Stage I only (an interrupted job), then the same command to the end, then again.

    Returns the run directory and the printed output of the second and third runs.
    """
    out = tmp_path_factory.mktemp("run") / "r"
    args = ["run", str(config), "--out", str(out)]
    assert main([*args, "--until", "stage1"]) == 0
    assert sorted(p.stem for p in (out / "done").glob("*.json")) == ["stage1"]
    assert not (out / "report.md").exists()
    logs = []
    for _ in range(2):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(args)
        logs.append(buf.getvalue())
        assert code == 0
        if not logs[1:]:
            mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    return out, logs, mtimes


def test_stage1_only_run_continues_and_rerun_skips_everything(run):
    out, (second, third), mtimes = run
    assert "[stage1] done already, skipped" in second
    for step in STEPS[1:]:
        assert f"[{step}] running" in second and f"[{step}] finished" in second
    for step in STEPS:
        assert f"[{step}] done already, skipped" in third
    assert "running" not in third
    assert f"report: {out / 'report.md'}" in third
    now = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert now == mtimes  # nothing rewritten (but the lock, which records who holds it)


def test_report_and_exports_are_written(run):
    out, _, _ = run
    text = (out / "report.md").read_text()
    for png in ("accuracy_vs_macs", "latency_vs_macs", "routes_per_class"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
        assert f"plots/{png}.png" in text
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["supernet"]] == ["x0.5", "x1"]
    (gated,) = report["gated"]
    assert gated["target"] == 0.9 and sum(gated["histogram"]) == 64
    assert len(gated["per_class"]) == 10 and len(report["routes"]) == 3
    assert {r["kind"] for r in report["latency"]["rows"]} == {"uniform", "route", "gated"}
    for name in ("largest", "smallest"):
        assert (out / "export" / f"{name}.pt").is_file() and (out / "export" / f"{name}.onnx").is_file()


def test_exported_gated_package_matches_pytorch(run):
    from dynaslice.onnx_package import GatedOnnxRunner

    out, _, _ = run
    gated, _ = load_supernet(latest_checkpoint(out / "gate-t0.9"))
    dyn = DynamicNet(gated.eval()).eval()
    x = torch.randn(16, 1, 12, 12)
    with torch.no_grad():
        ref, routes = dyn.forward_with_routes(x)
    got, got_routes = GatedOnnxRunner(out / "export" / "gated").forward_with_routes(x.numpy())
    assert np.array_equal(got_routes, routes.numpy())
    assert np.abs(got - ref.numpy()).max() <= 1e-4


def test_changed_training_config_is_refused(run, config, capsys):
    out, _, _ = run
    assert main(["run", str(config), "--out", str(out), "--set", "optim.lr=0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.lr" in err


def test_export_arch_onnx_equals_pytorch_and_pt_loads_without_dynaslice(run, tmp_path):
    from dynaslice.onnx_package import OnnxModel

    out, _, _ = run
    ckpt = out / "stage1" / "recalibrated.safetensors"
    assert main(["export", str(ckpt), "--arch", "x0.5", "--out", str(tmp_path / "s.onnx")]) == 0
    assert (
        main(["export", str(ckpt), "--arch", "x0.5", "--format", "torch", "--out", str(tmp_path / "s.pt")])
        == 0
    )
    net, _ = load_supernet(ckpt)
    net.eval()
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        ref = net(x, net.space.uniform(0.5))
    assert np.abs(OnnxModel(tmp_path / "s.onnx")(x.numpy()) - ref.numpy()).max() <= 1e-4
    torch.save(x, tmp_path / "x.pt")
    torch.save(ref, tmp_path / "ref.pt")
    code = (
        "import sys, torch; sys.modules['dynaslice'] = None\n"  # any dynaslice import fails
        f"m = torch.load({str(tmp_path / 's.pt')!r}, weights_only=False).eval()\n"
        f"x, ref = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.no_grad(): assert (m(x) - ref).abs().max() <= 1e-5\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{run}/missing", "--arch", "largest", "--out", "{tmp}/a.pt"],
        ["export", "{run}/stage1", "--arch", '{{"s1": 3}}', "--out", "{tmp}/a.pt"],
        ["export", "{run}/stage1", "--arch", "x0.5x", "--out", "{tmp}/a.pt"],
        ["export", "{run}/stage1", "--budget-macs", "3M", "--out", "{tmp}/a.pt"],
        ["export", "{run}/pipeline.yaml", "--arch", "largest", "--out", "{tmp}/a.pt"],
        ["export", "{run}/gate-t0.9", "--arch", "route7", "--out", "{tmp}/a.pt"],
        ["export", "{run}/gate-t0.9", "--gated", "--out", "{run}"],
        ["run", "{tmp}/missing.yaml"],
        ["run", "{cfg}", "--out", "{tmp}/new", "--until", "stage3"],
        ["run", "{cfg}", "--out", "{tmp}/new", "--set", "run.gate_target=[0.5]"],
        ["run", "{cfg}", "--out", "{tmp}/new", "--set", "model.gate.enabled=false"],
    ],
)
def test_bad_inputs_exit_2_with_one_line(run, config, tmp_path, capsys, argv):
    out, _, _ = run
    argv = [a.format(run=out, tmp=tmp_path, cfg=config) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dynaslice {argv[0]}: error:"), err
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- latency and report (issue 33 item 6)


def test_every_latency_row_is_timed_the_same_way(run, config, tmp_path, monkeypatch, capsys):
    """A gated model and the static subnets run the same calls per round (the same test images
    one at a time at batch 1, one batch at the large size), and every row is the median of the
    per-image times of its rounds: the same statistic for every row."""
    import shutil
    import statistics

    from dynaslice import pipeline
    from dynaslice.pipeline import load_run_config

    out, _, _ = run
    copy = tmp_path / "r"
    shutil.copytree(out, copy)
    cfg, rc = load_run_config(config, [])
    calls: dict[str, list[int]] = {}

    def counted(make):
        def serve(*args, **kwargs):
            model = make(*args, **kwargs)
            key = f"{len(calls)}"
            calls[key] = []

            def call(x):
                calls[key].append(len(x))
                return model(x)

            return call

        return serve

    monkeypatch.setattr(pipeline, "serve_subnet", counted(pipeline.serve_subnet))
    monkeypatch.setattr(pipeline, "serve_gated", counted(pipeline.serve_gated))
    monkeypatch.setenv("DYNASLICE_PROGRESS_SECONDS", "0")  # a line per update: the step is not silent
    pipeline.step_latency(copy, cfg, rc)
    err = capsys.readouterr().err
    assert "latency: preparing: 1/12 models" in err and "latency: 1/" in err
    per_round = rc.latency_images * [1] + [rc.latency_batch]
    n_calls = 2 + rc.latency_repeats  # two warm-up rounds
    assert len(calls) == 12 and all(sorted(c) == sorted(per_round * n_calls) for c in calls.values()), calls
    lat = json.loads((copy / "latency.json").read_text())
    assert lat["images"] == rc.latency_images
    for row in lat["rows"]:
        assert len(row["ms_all"]) == rc.latency_repeats and row["ms"] == statistics.median(row["ms_all"])


def _noisy_run(run, tmp_path) -> Path:
    """A copy of the run whose deployment rows of x1 are noisy (rounds 1 ms and 10 ms) and whose
    gate sent every test image down route 0."""
    import shutil

    out, _, _ = run
    copy = tmp_path / "r"
    shutil.copytree(out, copy)
    lat = json.loads((copy / "latency.json").read_text())
    for row in lat["rows"]:
        if row["name"] == "x1":
            row["ms_all"], row["ms"] = [1.0, 1.0, 10.0, 10.0], 5.5
        else:
            row["ms_all"] = [row["ms"]] * 4
    (copy / "latency.json").write_text(json.dumps(lat))
    path = copy / "eval" / "gate-t0.9.json"
    g = json.loads(path.read_text())
    g["histogram"] = [g["images"], 0, 0]
    g["per_class"] = {c: [sum(v), 0, 0] for c, v in g["per_class"].items()}
    path.write_text(json.dumps(g))
    return copy


def test_report_shows_the_spread_and_flags_noisy_latency(run, tmp_path):
    from dynaslice.report import NOISY_SPREAD, write_report

    copy = _noisy_run(run, tmp_path)
    text = write_report(copy).read_text()
    # x1 on 2 runtimes x 2 batch sizes
    assert "**Warning: 4 of 24 latency rows are noisy**" in text and f"over {NOISY_SPREAD:g}x" in text
    (x1,) = [line for line in text.splitlines() if line.startswith("| supernet x1 |")]
    assert "5.50 (1.00-10.00) **noisy**" in x1
    (x05,) = [line for line in text.splitlines() if line.startswith("| supernet x0.5 |")]
    assert "noisy" not in x05 and "-" in x05.split("|")[4]  # its range is shown too
    report = json.loads((copy / "report.json").read_text())
    rows = {(r["name"], r["runtime"], r["batch"]): r for r in report["latency"]["rows"]}
    assert all(r["noisy"] == (r["name"] == "x1") for r in rows.values())


def test_report_says_which_routes_the_gate_never_takes(run, tmp_path):
    from dynaslice.report import write_report

    text = write_report(_noisy_run(run, tmp_path)).read_text()
    assert "3 routes, of which 1 is used: the gate sends no test image to route1, route2" in text
    assert "No test image goes down route1, route2: this gate uses 1 of its 3 routes." in text


def test_latency_plot_uses_a_log_axis(run, monkeypatch):
    """On a linear axis, a runtime 10x faster than eager, or one noisy round, squashes every other
    point onto zero."""
    from dynaslice import report

    out, _, _ = run
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    report.plot_latency(report.collect(out), out / "unused.png")
    (fig,) = figures
    assert fig.axes[0].get_yscale() == "log"
