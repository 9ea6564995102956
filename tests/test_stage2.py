"""Gated Stage I and Stage II (the gate) end to end on tiny synthetic data, through the CLI."""

import json

import pytest
import torch

from dynaslice.cli import main
from dynaslice.gate import GatedSupernet
from dynaslice.train import (
    ConfigError,
    SupernetTrainer,
    latest_checkpoint,
    load_config,
    load_model_file,
    load_supernet,
)
from dynaslice.train.config import from_dict
from dynaslice.train.stage2 import train_gate
from dynaslice.train.stage2_settings import Stage2Config

SETTINGS = [
    "data.name=synthetic",
    "data.image_size=12",
    "data.synthetic_train=320",
    "data.synthetic_test=96",
    "data.val_size=64",
    "data.batch_size=64",
    "model.kwargs={input_size: 12}",
    "model.gate.enabled=true",
    "model.gate.routes=3",
    "optim.lr=0.2",
    "train.epochs=3",
    "train.eval_every_epochs=0",
    "train.eval_widths=[1.0]",
    "train.recal_images=128",
    "train.recal_batch_size=64",
]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A gated Stage-I run (about 5 s), with its gate weights before training."""
    run = tmp_path_factory.mktemp("stage1")
    trainer = SupernetTrainer(load_config(None, SETTINGS), run)
    before = {k: v.clone() for k, v in trainer.net.gate.state_dict().items()}
    trainer.fit()
    return run, trainer, before


@pytest.fixture(scope="module")
def stage2(stage1, tmp_path_factory):
    """One Stage-II run through the CLI (1 epoch), BN statistics kept from the Stage-I file."""
    run, _, _ = stage1
    out = tmp_path_factory.mktemp("stage2") / "gate"
    args = ["train-gate", str(run), "--out", str(out), "--recalibrate", "no", "--epochs", "1"]
    assert main([*args, "--target-macs", "0.8"]) == 0
    return out


def test_stage1_trains_the_attention_head_and_checkpoint_keeps_the_gate(stage1):
    run, trainer, before = stage1
    gate = trainer.net.gate
    assert not torch.equal(gate.attention.weight, before["attention.weight"])  # trained in Stage I
    assert not torch.equal(gate.reduce.weight, before["reduce.weight"])
    assert torch.equal(gate.slimming.weight, before["slimming.weight"])  # Stage II's job
    net, meta = load_supernet(run)
    assert isinstance(net, GatedSupernet)
    assert meta["model"]["gate"]["routes"] == [a.to_dict() for a in trainer.net.routes]
    assert (net.cut, net.routes, net.gate.hidden) == (trainer.net.cut, trainer.net.routes, gate.hidden)
    for k, v in trainer.net.state_dict().items():
        assert torch.equal(net.state_dict()[k], v.cpu()), k


def test_train_gate_changes_only_the_slimming_head(stage1, stage2):
    run, trainer, _ = stage1
    src, _ = load_model_file(latest_checkpoint(run) / "model.safetensors")
    new, meta = load_model_file(latest_checkpoint(stage2) / "model.safetensors")
    assert meta["stage"] == 2 and meta["model"]["gate"]["routes"] == [a.to_dict() for a in trainer.net.routes]
    assert {k for k in src if not k.startswith("ema.")} == new.keys()
    changed = {k for k in new if not torch.equal(new[k], src[k])}
    assert changed == {"model.gate.slimming.weight", "model.gate.slimming.bias"}
    lines = [json.loads(x) for x in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert any("gate_ce" in r for r in lines) and any("val" in r for r in lines)
    final = json.loads((stage2 / "final_eval.json").read_text())
    assert final == [r["val"] for r in lines if "val" in r][-1]  # the calibrated gate's evaluation
    assert final["avg_macs"] <= 0.8 * max(r["macs"] for r in final["routes"])


def test_target_macs_moves_average_macs(stage1, tmp_path):
    """Low vs high target on the same start; one net object, so its MAC model is built once."""
    run, _, _ = stage1
    net, meta = load_supernet(run)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    widest = float(net.route_macs().max())
    macs = []
    for name, target in (("low", 0.55), ("high", 1.0)):
        net.load_state_dict(start)
        cfg = from_dict(meta["config"])
        cfg.stage2 = Stage2Config(epochs=3, lr=0.2, target_macs=target)
        macs.append(train_gate(net, cfg, tmp_path / name, meta, recalibrate=False)["avg_macs"])
        assert macs[-1] <= target * widest  # the calibrated gate meets its budget on validation
    assert macs[0] < macs[1]


def test_eval_of_a_gated_checkpoint(stage2, tmp_path, capsys):
    results = []
    for i in range(2):
        path = tmp_path / f"eval{i}.json"
        assert main(["eval", str(stage2), "--json", str(path)]) == 0
        results.append(json.loads(path.read_text())["gated"])
    assert results[0] == results[1]  # argmax routing: deterministic
    r = results[0]
    assert r["images"] == 96 and sum(r["histogram"]) == 96
    assert [sum(c) for c in zip(*r["per_class"].values(), strict=True)] == r["histogram"]
    assert len(r["per_class"]) == 10 and len(r["routes"]) == 3
    assert 0 <= r["sgs"]["agreement"] <= 100 and r["sgs"]["easy"] + r["sgs"]["hard"] == 96
    assert min(x["macs"] for x in r["routes"]) <= r["avg_macs"] <= max(x["macs"] for x in r["routes"])
    assert "SGS agreement" in capsys.readouterr().out


def test_bad_target_is_a_one_line_error(stage1, tmp_path, capsys):
    run, _, _ = stage1
    out = tmp_path / "x"
    code = main(["train-gate", str(run), "--out", str(out), "--target-macs", "0.1"])  # below the narrowest
    err = capsys.readouterr().err.strip()
    assert code == 2 and "target MACs" in err and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"stage2.target_macs=-1.0 is out of range"):
        load_config(None, [*SETTINGS, "stage2.target_macs=-1"])
