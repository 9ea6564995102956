"""Run directories written by dynaslice 0.1.0 (``tests/data/legacy_v010``, before the restructure)
still load: model files, the gated pipeline run, Stage-II checkpoints and a PSS budget table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import dynaslice as ds
from dynaslice.cli import main
from dynaslice.modelfile import load_model_file
from dynaslice.train.checkpoint import load_checkpoint

LEGACY = Path(__file__).parent / "data" / "legacy_v010"


def test_stage1_run_and_its_files_load():
    net, meta = ds.load_supernet(LEGACY / "run" / "stage1")
    assert isinstance(net, ds.GatedSupernet) and meta["model"]["name"] == "mobilenet_v2"
    recal, recal_meta = ds.load_supernet(LEGACY / "run" / "stage1" / "recalibrated.safetensors")
    assert set(recal_meta["recalibrated"]) == {"x0.5", "x1"}
    ckpt = load_checkpoint(next((LEGACY / "run" / "stage1" / "checkpoints").glob("step-*")))
    assert ckpt.state["step"] == ckpt.meta["step"] > 0  # no checksums then: loads all the same
    x = torch.randn(2, *net.input_size)
    with torch.no_grad():
        assert net.eval()(x, net.space.largest()).shape == (2, net.num_classes)


def test_gated_stage2_run_runs_dynamically():
    gated, meta = ds.load_supernet(LEGACY / "run" / "gate-t0.9")
    assert meta["stage"] == 2 and len(gated.routes) == 2
    dyn = ds.DynamicNet(gated)
    x = torch.randn(3, *gated.input_size)
    with torch.no_grad():
        out, routes = dyn.forward_with_routes(x)
        for i in range(3):  # equal to each sample alone
            assert torch.allclose(out[i : i + 1], dyn(x[i : i + 1]), atol=1e-5)
    assert out.shape == (3, gated.num_classes) and routes.shape == (3,)


def test_pss_budget_table_loads_and_switches():
    budget = ds.BudgetNet.load(LEGACY / "pss").eval()
    cheapest = min(budget.table.entries, key=lambda e: e.macs)
    x = torch.randn(2, *budget.net.input_size)
    with torch.no_grad():
        assert budget(x, max_macs=cheapest.macs).shape == (2, budget.net.num_classes)
    assert ds.BudgetTable.load(LEGACY / "pss").entries == budget.table.entries


def test_cli_reads_legacy_runs(tmp_path, capsys):
    assert main(["eval", str(LEGACY / "run" / "stage1" / "recalibrated.safetensors"), "--recalibrate", "no"]) == 0
    assert main(["eval", str(LEGACY / "run" / "gate-t0.9"), "--recalibrate", "no"]) == 0
    assert main(["select", str(LEGACY / "pss"), "--max-macs", "1G"]) == 0
    assert main(["export", str(LEGACY / "run" / "gate-t0.9"), "--arch", "route0", "--out", str(tmp_path / "r.pt")]) == 0
    assert "error" not in capsys.readouterr().err


def test_finished_legacy_pipeline_rerun_skips_every_step(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "run", run)
    assert main(["run", str(LEGACY / "tiny.yaml"), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "[stage1] done already, skipped" in out and "[gate-t0.9] done already, skipped" in out


def test_a_new_model_file_has_a_checksum_and_a_legacy_one_has_none(tmp_path):
    legacy = LEGACY / "run" / "stage1" / "recalibrated.safetensors"
    tensors, meta = load_model_file(legacy)
    from safetensors import safe_open

    with safe_open(str(legacy), framework="pt") as f:
        assert "dynaslice.sha256" not in (f.metadata() or {})
    ds.modelfile.save_model_file(tmp_path / "new.safetensors", tensors, meta)
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        assert "dynaslice.sha256" in (f.metadata() or {})
    with pytest.raises(ds.modelfile.CheckpointError, match="not found"):
        load_model_file(tmp_path / "missing.safetensors")
