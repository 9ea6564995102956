"""ReCU, SiMaN and the plain BNN (issue 30): each layer computes the contract's +-1 conv x scale,
gradients reach what they train, the per-epoch schedules, SiMaN's balanced weights, the
weight-decay rule of each method, and ``dynaslice binarize`` on the engine."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_reliability import cli, one_line_error

from dynaslice.binary.layers import (
    PlainBinaryConv2d,
    ReCUConv2d,
    SiManConv2d,
    SiManWDConv2d,
    SiManZeroOneConv2d,
    binarize,
    center_per_sample,
)
from dynaslice.binary.methods import binary_method_names, build_binary_model, method, recu_tau, siman_percent
from dynaslice.binary.train import MODEL_FILE, load_binary_model
from dynaslice.train.config import OptimConfig
from dynaslice.train.optim import build_optimizer

PM1 = (PlainBinaryConv2d, ReCUConv2d, SiManConv2d, SiManWDConv2d)


def layer(cls: type, seed: int = 0, stride: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(4, 6, 3, stride=stride, padding=1)  # 4 * 3 * 3 = 36 weights per filter (even)


@pytest.mark.parametrize("cls", PM1)
@pytest.mark.parametrize("stride", [1, 2])
def test_eval_forward_is_the_deploy_specs_pm1_conv_times_scale(cls, stride):
    conv = layer(cls, stride=stride)
    x = torch.randn(3, 4, 7, 7)
    conv.train()(x)  # SiMaN ranks B in training and keeps it for eval
    conv.eval()
    spec = conv.deploy_spec()
    t = center_per_sample(x) if spec.center else x
    expected = F.conv2d(binarize(t), spec.weight.float(), None, spec.stride, spec.padding) * spec.scale.view(1, -1, 1, 1)
    assert set(spec.weight.unique().tolist()) <= {-1, 1}
    assert torch.equal(conv(x), expected)


@pytest.mark.parametrize("cls", PM1)
def test_the_training_forward_has_the_same_signs(cls):
    """Training-only input scaling (ReCU) and standardisation (SiMaN) move gradients, never a sign."""
    conv = layer(cls).train()
    x = torch.randn(2, 4, 5, 5)
    out = conv(x)
    spec = conv.deploy_spec()
    t = center_per_sample(x) if spec.center else x
    expected = F.conv2d(binarize(t), spec.weight.float(), None, 1, 1) * spec.scale.view(1, -1, 1, 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("cls", PM1)
def test_gradients_reach_latent_weights_scales_and_inputs(cls):
    conv = layer(cls).train()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    (conv(x) * torch.randn(2, 6, 5, 5)).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    if hasattr(conv, "alpha"):
        assert conv.alpha.grad is not None and conv.alpha.grad.abs().sum() > 0


def test_recu_clamp_stops_the_gradient_of_dead_weights_only():
    """The rectified clamp: no gradient through ``w1`` beyond ``Q`` (the standardisation's mean and
    std still reach every latent weight, so the test reads the gradient at ``w1``)."""
    conv = layer(ReCUConv2d).train()
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 50.0  # far beyond Q after standardisation
    w1 = conv.standardized_weight().detach().requires_grad_()
    conv.standardized_weight = lambda: w1
    (conv(torch.randn(2, 4, 5, 5)) * torch.randn(2, 6, 5, 5)).sum().backward()
    q = -w1.abs().mean() * math.log(2 - 2 * 0.85)
    dead = w1.detach().abs() > q
    assert dead[0, 0, 0, 0] and torch.equal(w1.grad[dead], torch.zeros(int(dead.sum())))
    assert bool((w1.grad[~dead] != 0).any())


def test_recu_weights_are_the_sign_of_the_centred_filter():
    conv = layer(ReCUConv2d)
    w = conv.weight.detach()
    assert torch.equal(conv.binary_weight().detach(), binarize(w - w.mean(dim=(1, 2, 3), keepdim=True)))


def test_siman_balanced_pm1_per_filter_by_magnitude_and_kept_in_eval():
    conv = layer(SiManConv2d).train()
    conv(torch.randn(2, 4, 5, 5))
    w = conv.binary_weight().detach().flatten(1)
    assert torch.equal(w.sum(1), torch.zeros(6))  # half +1, half -1 in every filter
    mag = conv.magnitudes().detach()
    for i in range(6):  # +1 exactly where the magnitude ranks in the top half
        assert mag[i][w[i] > 0].min() > mag[i][w[i] < 0].max()
    conv.eval()
    with torch.no_grad():
        conv.weight.mul_(-3).add_(1)
    assert torch.equal(conv.binary_weight().detach().flatten(1), w)


def test_siman_clips_the_latent_weights_to_the_percentiles():
    conv = layer(SiManConv2d).train()
    conv.percent.fill_(15.0)
    w0 = conv.weight.detach().clone()
    mag = (w0 - w0.mean(dim=(1, 2, 3), keepdim=True)).abs().flatten()
    lo, hi = torch.quantile(mag, torch.tensor([0.15, 0.85]))
    conv(torch.randn(1, 4, 5, 5))
    after = conv.weight.detach().abs()
    assert torch.isclose(after.max(), hi) and torch.isclose(after.min(), lo)


def test_siman_zero_one_is_refused_a_pm1_deployment():
    conv = layer(SiManZeroOneConv2d).train()
    conv(torch.randn(1, 4, 5, 5))
    assert set(conv.binary_weight().detach().unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="not \\+-1"):
        conv.deploy_spec()


def test_tau_and_percentile_schedules_at_the_first_and_last_epoch():
    assert recu_tau(0, 5) == pytest.approx(0.85)
    assert recu_tau(5, 5) == pytest.approx(0.99)  # reached after the last epoch, as the official cpt_tau
    assert 0.85 < recu_tau(4, 5) < 0.99
    assert siman_percent(0, 5) == 15.0 and siman_percent(4, 5) == pytest.approx(3.0)
    model = build_binary_model("recu", width_mult=0.125)
    for name, first, last in (("recu", 0.85, recu_tau(2, 3)), ("recu_tau085", 0.85, 0.85), ("recu_tau099", 0.99, 0.99)):
        for epoch, want in ((0, first), (2, last)):
            method(name).epoch_hook(model, epoch, 3)
            taus = [float(m.tau) for m in model.modules() if isinstance(m, ReCUConv2d)]
            assert taus and taus == pytest.approx([want] * len(taus)), (name, epoch)
    model = build_binary_model("siman", width_mult=0.125)
    for name, first, last in (("siman", 15.0, 5.0), ("siman_noclip", 0.0, 0.0)):
        for epoch, want in ((0, first), (2, last)):
            method(name).epoch_hook(model, epoch, 3)
            percents = [float(m.percent) for m in model.modules() if isinstance(m, SiManConv2d)]
            assert percents and percents == pytest.approx([want] * len(percents)), (name, epoch)


BINARY_CONV = r"layer\d\.\d\.conv\d\."


@pytest.mark.parametrize(
    "name, decayed",
    [
        ("fp", rf"conv1\.weight|fc\.weight|{BINARY_CONV}weight"),
        ("bnn", rf"conv1\.weight|fc\.weight|{BINARY_CONV}weight"),
        ("recu", rf"conv1\.weight|fc\.weight|{BINARY_CONV}(weight|alpha)"),
        ("siman", r"conv1\.weight|fc\.weight"),  # no decay on binary weights nor alpha; none on PReLU, BN
        ("siman_noclip", r"conv1\.weight|fc\.weight"),
        ("siman_wd", rf"conv1\.weight|fc\.weight|{BINARY_CONV}weight"),
    ],
)
def test_weight_decay_groups_follow_each_methods_rule(name, decayed):
    model = build_binary_model(name, width_mult=0.125)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_optimizer(model, OptimConfig(weight_decay=5e-4)).param_groups
    got = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    want = {n for n in names.values() if re.fullmatch(decayed, n)}
    assert got[5e-4] == want
    assert got[0.0] == set(names.values()) - want
    if name.startswith("siman"):
        assert any(n.endswith("alpha") for n in got[0.0]) and any("act" in n for n in got[0.0])


# --------------------------------------------------------------------------- the command

TINY = {
    "binary": {"width_mult": 0.125},
    "data": {"name": "synthetic", "image_size": 8, "batch_size": 8, "val_size": 8, "synthetic_train": 32,
             "synthetic_test": 16},
    "optim": {"lr": 0.05},
    "train": {"epochs": 2, "threads": 1, "eval_every_epochs": 0, "log_every_steps": 1},
}  # fmt: skip


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.mark.parametrize("name", ["recu", "siman"])
def test_binarize_trains_saves_and_applies_the_schedule_each_epoch(tmp_path, tiny_config, name):
    run = tmp_path / "run"
    rc, out, err = cli("binarize", name, "--config", tiny_config, "--out", run, "--test")
    assert rc == 0, err
    result = json.loads((run / "final_eval.json").read_text())
    assert result["method"] == name and result["test_images"] == 16
    assert 0 <= result["accuracy"] <= 100 and 0 <= result["test_accuracy"] <= 100
    assert result["ops"] == result["flops"] + result["bops"] / 64 and result["bops"] > 0
    model, spec = load_binary_model(run / MODEL_FILE)
    assert spec["method"] == name and not model.training
    buffer, want = ("tau", recu_tau(1, 2)) if name == "recu" else ("percent", siman_percent(1, 2))
    values = [float(getattr(m, buffer)) for m in model.modules() if hasattr(m, buffer)]
    assert values and values == pytest.approx([want] * len(values))  # the last epoch's, set by the engine's hook
    assert math.isfinite(model(torch.zeros(1, 1, 8, 8)).sum().item())


def test_binarize_mistakes_are_one_line(tmp_path, tiny_config):
    one_line_error(cli("binarize", "xnor", "--config", tiny_config, "--out", tmp_path / "a"), "unknown binary method", "recu")
    one_line_error(
        cli("binarize", "bnn", "--config", tiny_config, "--set", "binary.width_mult=-1", "--out", tmp_path / "b"),
        "binary.width_mult",
    )
    one_line_error(
        cli("binarize", "bnn", "--config", tiny_config, "--set", "binary.tau=0.9", "--out", tmp_path / "c"),
        "unknown config key 'binary.tau'",
    )
    one_line_error(cli("binarize", "bnn", "--config", tiny_config, "--set", "optim.lr=-1", "--out", tmp_path / "d"), "optim.lr")
    run = tmp_path / "run"
    tiny_config.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 1}}))
    assert cli("binarize", "bnn", "--config", tiny_config, "--out", run)[0] == 0
    one_line_error(cli("binarize", "bnn", "--config", tiny_config, "--out", run), "already holds a run")


def test_every_arm_of_the_experiments_is_registered():
    assert list(binary_method_names()) == [
        "fp", "bnn", "recu", "recu_tau085", "recu_tau099", "siman", "siman_wd", "siman_noclip", "siman01",
    ]  # fmt: skip
