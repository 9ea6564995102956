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
    from dynaslice.runtime import GatedOnnxRunner

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
    from dynaslice.runtime import OnnxModel

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
