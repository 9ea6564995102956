"""init_from (every kind of source, clear refusals), the frozen-teacher target, zero-init of the last
BN gamma, and the loop wiring: a supernet started from a trained, reordered network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import dynaslice as ds
from dynaslice.gate import GatedSupernet
from dynaslice.space import Arch
from dynaslice.train import SupernetTrainer, load_config, save_model_file, train
from dynaslice.train.init import InitSourceError, frozen_copy, init_from, zero_init_last_bn
from dynaslice.train.targets import FrozenTeacherTarget, make_target, soft_cross_entropy

torch.set_num_threads(1)
SPEC = {"name": "resnet_small", "kwargs": {"in_chans": 1, "input_size": 8, "num_classes": 10}}


def trained_like(seed: int, **kwargs) -> ds.Supernet:
    """A resnet_small whose every tensor is random (so a tensor that is not loaded shows)."""
    torch.manual_seed(seed)
    net = ds.create_supernet("resnet_small", **{**SPEC["kwargs"], **kwargs})
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.3)
    return net.eval()


def save_supernet(net: ds.Supernet, path: Path, spec: dict = SPEC) -> Path:
    save_model_file(path, {f"model.{k}": v for k, v in net.state_dict().items()}, {"model": spec})
    return path


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_from_a_model_file_a_static_run_and_its_recalibrated_weights(tmp_path):
    src = trained_like(1)
    net = ds.create_supernet("resnet_small", **SPEC["kwargs"])
    info = init_from(net, save_supernet(src, tmp_path / "m.safetensors"), SPEC)
    assert info["kind"] == "dynaslice" and same_state(net, src)

    # RUN of a static run -> RUN/static-x1, and its recalibrated.safetensors before checkpoints
    run = tmp_path / "run" / "static-x1"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-00000001")
    save_supernet(trained_like(2), run / "checkpoints" / "step-00000001" / "model.safetensors")
    recal = trained_like(3)
    save_supernet(recal, run / "recalibrated.safetensors")
    net = ds.create_supernet("resnet_small", **SPEC["kwargs"])
    assert init_from(net, tmp_path / "run")["source"].endswith("static-x1/recalibrated.safetensors")
    assert same_state(net, recal)
    (run / "recalibrated.safetensors").unlink()  # a run killed before its end: the last checkpoint
    init_from(net, run)
    assert same_state(net, trained_like(2))


def test_from_a_plain_state_dict_of_the_static_model(tmp_path):
    src = trained_like(4)
    static = ds.extract_subnet(src, src.space.largest())  # torch.nn modules, torchvision-style names
    path = tmp_path / "static.safetensors"
    save_file({k: v.contiguous() for k, v in static.state_dict().items()}, str(path))
    net = ds.create_supernet("resnet_small", **SPEC["kwargs"]).eval()
    assert init_from(net, path)["kind"] == "state_dict"
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, net.space.largest()), static(x), rtol=0, atol=1e-5)


def gated_resnet(seed: int = 0) -> GatedSupernet:
    torch.manual_seed(seed)
    return GatedSupernet(ds.create_supernet("resnet_small", **SPEC["kwargs"]), cut=1, routes=3)


def test_a_network_without_a_gate_goes_into_a_gated_supernets_backbone(tmp_path):
    src = trained_like(5)
    gated = gated_resnet()
    info = init_from(gated, save_supernet(src, tmp_path / "plain.safetensors"), SPEC)
    assert info["gate"].startswith("new") and same_state(gated.net, src)
    x = torch.rand(3, gated.gate.channels, 4, 4)  # the new attention head: 0.98 on every channel
    torch.testing.assert_close(gated.gate.attend(x), 0.98 * x)

    # a plain state dict of the static model too
    static = ds.extract_subnet(src, src.space.largest())
    save_file({k: v.contiguous() for k, v in static.state_dict().items()}, str(tmp_path / "static.safetensors"))
    other = gated_resnet(1)
    assert "gate" in init_from(other, tmp_path / "static.safetensors")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = other.net.eval()(x, other.net.space.largest())
        torch.testing.assert_close(y, static(x), rtol=0, atol=1e-5)

    # a gated supernet's own weights load whole, its trained gate included
    with torch.no_grad():
        gated.gate.attention.weight.normal_()
    spec = {**SPEC, "gate": gated.spec()}
    again = gated_resnet(2)
    info = init_from(again, save_supernet(gated, tmp_path / "gated.safetensors", spec), SPEC)
    assert "gate" not in info and same_state(again, gated)
    # ... and never into a supernet without a gate
    with pytest.raises(InitSourceError, match="is a gated supernet and .* has no gate: set model.gate.enabled"):
        init_from(ds.create_supernet("resnet_small", **SPEC["kwargs"]), tmp_path / "gated.safetensors", SPEC)
    with pytest.raises(ValueError, match="never reaches 1"):
        gated.gate.start_near_identity(1.0)


def test_mismatched_or_missing_sources_are_refused_in_one_line(tmp_path):
    net = ds.create_supernet("resnet_small", **SPEC["kwargs"])
    other = {"name": "resnet_small", "kwargs": {**SPEC["kwargs"], "num_classes": 5}}
    path = save_supernet(trained_like(0, num_classes=5), tmp_path / "five.safetensors", other)
    with pytest.raises(
        InitSourceError, match=r"num_classes=5.*does not fit.*num_classes=10.*fc\.weight"
    ) as e:
        init_from(net, path, SPEC)
    assert "\n" not in str(e.value)
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InitSourceError, match="does not fit the largest subnet"):
        init_from(net, tmp_path / "plain.safetensors")
    with pytest.raises(InitSourceError, match="not found"):
        init_from(net, tmp_path / "nothing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InitSourceError, match="no checkpoint"):
        init_from(net, tmp_path / "empty_dir")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InitSourceError, match="not a readable"):
        init_from(net, tmp_path / "junk.safetensors")


def test_torchvision_sources_are_checked_before_any_download():
    net = ds.create_supernet("resnet_small", **SPEC["kwargs"])
    with pytest.raises(InitSourceError, match="unknown torchvision weights"):
        init_from(net, "torchvision:NoSuch_Weights.X")
    with pytest.raises(InitSourceError, match="11689512-parameter model.*build the matching family"):
        init_from(net, "torchvision:ResNet18_Weights.IMAGENET1K_V1")


def test_zero_init_last_bn_zeroes_the_end_of_every_residual_branch():
    net = ds.create_supernet("resnet_small")
    assert zero_init_last_bn(net) == 8
    assert all(not b.bn2.weight.detach().any() for s in net.stages() for b in s)
    assert all(b.bn1.weight.detach().all() for s in net.stages() for b in s)
    assert zero_init_last_bn(ds.create_supernet("mobilenet_v1_small")) == 0  # no residuals: unchanged


# --------------------------------------------------------------------------- the frozen-teacher target


def teacher_target(**kwargs) -> tuple[FrozenTeacherTarget, ds.Supernet]:
    teacher = frozen_copy(trained_like(5))
    return make_target("teacher", teacher.space, teacher=teacher, **kwargs), teacher


def test_teacher_target_losses_ramp_and_label_term():
    target, teacher = teacher_target(ramp_steps=4)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(10, (6,))
    space = teacher.space
    largest, small = space.largest(), space.smallest()
    logits = torch.randn(6, 10)
    with torch.no_grad():
        probs = torch.softmax(teacher(x, largest), -1)
    kd = soft_cross_entropy(logits, probs)
    ce = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert [target.weight(s) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    step = target.begin(x, y, [largest, small], step=1)
    torch.testing.assert_close(step.loss(largest, logits), ce)  # largest: labels only
    torch.testing.assert_close(step.loss(small, logits), 0.4 * kd)
    both, _ = teacher_target(label_term=True, kd_largest=True)
    both.teacher = teacher
    step = both.begin(x, y, [largest, small], step=0)
    torch.testing.assert_close(step.loss(small, logits), kd + ce)
    torch.testing.assert_close(step.loss(largest, logits), kd + ce)
    with pytest.raises(ValueError, match="needs a trained teacher"):
        make_target("teacher", space)


def test_the_teacher_never_receives_gradients_nor_changes():
    target, teacher = teacher_target()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = trained_like(6).train()
    teacher.train()  # even if someone flips its mode, begin() runs it in eval mode
    x, y = torch.randn(8, 1, 8, 8), torch.randint(10, (8,))
    archs = [student.space.largest(), student.space.smallest()]
    step = target.begin(x, y, archs)
    assert not teacher.training
    for a in archs:
        step.loss(a, student(x, a)).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


# --------------------------------------------------------------------------- the loop wiring

TINY = {
    "model": {"kwargs": {"ratios": [0.5, 0.75, 1.0]}},
    "data": {"name": "synthetic", "image_size": 8, "batch_size": 8, "val_size": 32, "synthetic_train": 64},
    "train": {
        "epochs": 1,
        "threads": 1,
        "eval_every_epochs": 0,
        "eval_widths": [0.5, 1.0],
        "recal_images": 32,
        "recal_batch_size": 16,
    },
}


def test_trainer_starts_from_a_static_run_reordered_and_teaches_with_it(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    train(load_config(path, ["train.static_widths=[1.0]"]), tmp_path / "p1")
    src = ds.train.load_supernet(tmp_path / "p1" / "static-x1" / "recalibrated.safetensors")[0].eval()
    overrides = [
        f"train.init_from={tmp_path / 'p1'}",
        "train.order_channels=true",
        "train.target=teacher",
        "train.kd_ramp_epochs=0.5",
        "optim.clip_grad_value=1.0",
    ]
    cfg = load_config(path, overrides)
    trainer = SupernetTrainer(cfg, tmp_path / "p2")
    x = torch.randn(4, 1, 8, 8)
    largest = Arch(trainer.space.largest())
    trainer.net.eval()
    with torch.no_grad():  # reordered: the same function, other weights
        torch.testing.assert_close(trainer.net(x, largest), src(x, largest), rtol=0, atol=1e-5)
        torch.testing.assert_close(trainer.target.teacher(x, largest), src(x, largest), rtol=0, atol=1e-5)
    assert not same_state(trainer.net, src)
    assert trainer.steps_per_epoch == 4 and trainer.target.ramp_steps == 2 and trainer.ema is None
    teacher_before = {k: v.clone() for k, v in trainer.target.teacher.state_dict().items()}
    trainer.fit()
    assert all(torch.equal(teacher_before[k], v) for k, v in trainer.target.teacher.state_dict().items())

    # a gated supernet from the same network without a gate: the teacher has its new gate too,
    # near the identity (a random attention head would halve every channel at the cut)
    gated = SupernetTrainer(load_config(path, [*overrides, "model.gate.enabled=true", "model.gate.routes=2"]), tmp_path / "p3")
    attention = gated.target.teacher.gate.attention
    assert not attention.weight.any() and torch.sigmoid(attention.bias).allclose(torch.tensor(0.98))


def test_teacher_target_without_a_source_is_a_config_error(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    with pytest.raises(ValueError, match="train.target=teacher needs a trained network to teach: train.init_from"):
        load_config(path, ["train.target=teacher"])


def test_uniform_sandwich_draws_only_uniform_width_subnets():
    from dynaslice.train import SandwichSampler

    space = ds.create_supernet("resnet_small").space
    uniform = {space.uniform(r / 100) for r in range(35, 101)}
    sampler = SandwichSampler(space, 4, seed=0, uniform=True)
    drawn = [a for step in range(50) for a in sampler.sample(step)[2:]]
    assert set(drawn) <= uniform and len(set(drawn)) > 5
    assert sampler.sample(7) == SandwichSampler(space, 4, seed=0, uniform=True).sample(7)
    assert not set(a for step in range(50) for a in SandwichSampler(space, 4).sample(step)[2:]) <= uniform
    with pytest.raises(ValueError, match="uniform=True"):
        sampler.load_state_dict(SandwichSampler(space, 4).state_dict())
