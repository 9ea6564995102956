"""dynaslice.train pieces, each checked alone on hand-made inputs: samplers, targets, EMA,
BN recalibration, optimizer groups and schedule, config errors, checkpoint files."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from dynaslice import create_supernet
from dynaslice.nn import SlicedBatchNorm2d, SlicedConv2d, SlicedLinear
from dynaslice.space import Arch, Dim, SearchSpace
from dynaslice.train import (
    CheckpointError,
    ConfigError,
    FixedSampler,
    IBTarget,
    IEBTarget,
    InplaceDistillTarget,
    LabelsTarget,
    SandwichSampler,
    build_optimizer,
    build_scheduler,
    ema_decay_for,
    load_config,
    load_model_file,
    make_ema,
    mix_views,
    param_groups,
    recalibrate_bn,
    soft_cross_entropy,
)
from dynaslice.train.checkpoint import latest_checkpoint, load_state, save_checkpoint
from dynaslice.train.config import OptimConfig
from dynaslice.train.data import synthetic_dataset

torch.set_num_threads(1)

SPACE = SearchSpace((Dim("a", (1, 2, 3, 4)), Dim("b", (8, 16, 24))))
L, S = SPACE.largest(), SPACE.smallest()


def tiny_net(**kw):
    return create_supernet(
        "resnet_small", in_chans=1, input_size=8, num_classes=5, ratios=(0.5, 0.75, 1.0), **kw
    )


# --------------------------------------------------------------------------- samplers


def test_sandwich_is_a_pure_function_of_the_step():
    s1, s2 = SandwichSampler(SPACE, n=5, seed=3), SandwichSampler(SPACE, n=5, seed=3)
    draws = [s1.sample(k) for k in range(30)]
    # another instance (another rank), queried in another order, agrees step by step
    assert [s2.sample(k) for k in reversed(range(30))][::-1] == draws
    assert all(d[0] == L and d[1] == S and len(d) == 5 for d in draws)
    randoms = {tuple(sorted(a.items())) for d in draws for a in d[2:]}
    assert len(randoms) > 5  # really random across steps
    assert SandwichSampler(SPACE, n=5, seed=4).sample(7) != draws[7]  # the seed matters
    assert s1.sample(7) == draws[7]  # no hidden state advanced by earlier calls


def test_sampler_state_round_trip_and_mismatch():
    s = SandwichSampler(SPACE, n=4, seed=1)
    s.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="does not belong"):
        SandwichSampler(SPACE, n=3, seed=1).load_state_dict(s.state_dict())
    f = FixedSampler(S)
    assert f.sample(0) == f.sample(99) == [S]
    with pytest.raises(ValueError):
        FixedSampler(L).load_state_dict(f.state_dict())


# --------------------------------------------------------------------------- targets

B, K = 3, 4


def logits_for(seed: int) -> torch.Tensor:
    return torch.randn(B, K, generator=torch.Generator().manual_seed(seed))


def fake_teacher(log: list):
    """Teacher logits depend on the arch (and input), so a wrong arch gives a wrong target."""

    def teacher(x, arch):
        log.append(arch)
        return logits_for(arch["a"] * 10 + arch["b"]) + x.sum()

    return teacher


def ce_soft(logits, probs):
    return float(-(probs * logits.log_softmax(-1)).sum(-1).mean())


Y = torch.tensor([0, 3, 1])
X = torch.zeros(B, 1)


def test_labels_target_is_label_smoothed_ce_for_everyone():
    t = LabelsTarget(SPACE, label_smoothing=0.1).begin(X, Y, [L, S])
    z = logits_for(1)
    for arch in (L, S):
        assert float(t.loss(arch, z)) == pytest.approx(float(F.cross_entropy(z, Y, label_smoothing=0.1)))


def test_inplace_distillation_uses_the_largest_detached_softmax():
    t = InplaceDistillTarget(SPACE).begin(X, Y, [L, S])
    zl = logits_for(1).requires_grad_()
    loss_l = t.loss(L, zl)
    assert float(loss_l.detach()) == pytest.approx(
        float(F.cross_entropy(zl.detach(), Y, label_smoothing=0.1))
    )
    zs = logits_for(2).requires_grad_()
    loss_s = t.loss(S, zs)
    assert float(loss_s.detach()) == pytest.approx(ce_soft(zs.detach(), zl.detach().softmax(-1)))
    loss_s.backward()
    assert zl.grad is None  # the target is detached: no gradient flows into the largest
    with pytest.raises(ValueError, match="first"):
        InplaceDistillTarget(SPACE).begin(X, Y, [S, L])


def test_ib_targets_come_from_the_teacher_run_as_largest():
    log: list = []
    r = Arch(a=2, b=16)
    t = IBTarget(SPACE).begin(X, Y, [L, S, r], fake_teacher(log))
    assert log == [L]
    probs = logits_for(L["a"] * 10 + L["b"]).softmax(-1)
    z = logits_for(5)
    assert float(t.loss(L, z)) == pytest.approx(float(F.cross_entropy(z, Y, label_smoothing=0.1)))
    for arch in (S, r):
        assert float(t.loss(arch, z)) == pytest.approx(ce_soft(z, probs))
    with pytest.raises(ValueError, match="teacher"):
        IBTarget(SPACE).begin(X, Y, [L, S])


def test_ieb_ensemble_uses_exactly_the_students_random_archs():
    r1, r2 = Arch(a=2, b=16), Arch(a=3, b=8)
    log: list = []
    t = IEBTarget(SPACE).begin(X, Y, [L, S, r1, r2], fake_teacher(log))
    assert sorted(map(repr, log)) == sorted(map(repr, [L, r1, r2]))  # no fresh random subnets
    p = {a: logits_for(a["a"] * 10 + a["b"]).softmax(-1) for a in (L, r1, r2)}
    z = logits_for(9)
    ensemble = (p[L] + p[r1] + p[r2]) / 3
    assert float(t.loss(S, z)) == pytest.approx(ce_soft(z, ensemble))
    assert float(t.loss(r1, z)) == pytest.approx(ce_soft(z, p[L]))  # others: plain IB
    # a different draw of random subnets changes the smallest's target
    t2 = IEBTarget(SPACE).begin(X, Y, [L, S, r1, Arch(a=4, b=8)], fake_teacher([]))
    assert float(t2.loss(S, z)) != pytest.approx(float(t.loss(S, z)))


def test_temperature_scales_soft_targets_and_loss():
    z, q = logits_for(1), logits_for(2)
    T = 2.0
    want = -(F.softmax(q / T, -1) * F.log_softmax(z / T, -1)).sum(-1).mean() * T * T
    t = IBTarget(SPACE, temperature=T).begin(X, Y, [L, S], lambda x, a: q)
    assert float(t.loss(S, z)) == pytest.approx(float(want))


def test_mvco_target_averages_the_teacher_over_both_views():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.6, 0.4]])  # view-major: 2 views x B=2
    mixed = mix_views(p, views=2, weight=0.5)
    avg = (p[:2] + p[2:]) / 2
    assert torch.allclose(mixed, torch.cat([avg, avg]))
    assert torch.equal(mix_views(p, 2, 0.0), p)  # the ablation: per-view targets
    w = 0.25
    assert torch.allclose(mix_views(p, 2, w)[:2], 0.75 * p[:2] + 0.25 * p[2:])
    # through a target: both views of an image get the same soft target
    q = torch.randn(4, 2)
    t = IBTarget(SPACE, views=2).begin(torch.zeros(4, 1), torch.tensor([0, 1, 0, 1]), [L, S], lambda x, a: q)
    target = t.default
    assert torch.allclose(target[:2], target[2:])
    assert torch.allclose(target[:2], (q.softmax(-1)[:2] + q.softmax(-1)[2:]) / 2)


def test_soft_cross_entropy_equals_ce_for_one_hot():
    z = logits_for(3)
    assert float(soft_cross_entropy(z, F.one_hot(Y, K).float())) == pytest.approx(
        float(F.cross_entropy(z, Y))
    )


# --------------------------------------------------------------------------- EMA


def test_ema_update_is_an_exponential_moving_average():
    net = torch.nn.Linear(2, 2)
    ema = make_ema(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update_parameters(net)  # the first update copies
    assert torch.equal(ema.module.weight, net.weight)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update_parameters(net)
    assert torch.allclose(ema.module.weight, torch.full((2, 2), 0.9 * 1.0 + 0.1 * 3.0))
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())


def test_ema_decay_scaling_keeps_the_half_life_in_epochs():
    assert ema_decay_for(0.997, 0.0, 100) == 0.997
    d = ema_decay_for(0.997, 0.5, 100)  # half-life of 50 steps
    assert d**50 == pytest.approx(0.5)


# --------------------------------------------------------------------------- BN recalibration


def test_recalibration_is_cumulative_eval_preprocessed_and_covers_every_width():
    torch.manual_seed(0)
    net = tiny_net()
    data = synthetic_dataset(96, size=8, classes=5)
    small, big = net.space.uniform(0.5), net.space.largest()
    bns = {name: m for name, m in net.named_modules() if isinstance(m, SlicedBatchNorm2d)}
    for bn in bns.values():
        bn.running_mean.fill_(7.0)  # stale statistics that must disappear
    net.eval()
    recalibrate_bn(net, [small, big], data, num_images=96, batch_size=32, seed=0)
    assert not net.training and all(bn.momentum == 0.1 for bn in bns.values())  # restored
    # every width either arch uses is touched by exactly its 3 batches; other rows stay reset
    for name, bn in bns.items():
        dim = "s1" if name == "bn1" else "s" + name[len("layer")]
        used = {small[dim], big[dim]}
        for w in bn.widths:
            row = bn.row(w)
            assert int(bn.num_batches_tracked[row]) == (3 if w in used else 0), (name, w)
            if w not in used:
                assert float(bn.running_mean[row].abs().max()) == 0.0
    # cumulative averaging: the stem BN's mean at the small width is exactly the mean over all
    # 96 eval-preprocessed images (momentum 0.1 would weight the last batch far more)
    from dynaslice.train.bn import recal_batches

    x = torch.cat(recal_batches(data, 96, 32, seed=0))
    w = small["s1"]
    with torch.no_grad():
        act = net.conv1(x, w)
    row = net.bn1.row(w)
    assert torch.allclose(net.bn1.running_mean[row, :w], act.mean((0, 2, 3)), atol=1e-5)
    per_batch = act.view(3, 32, *act.shape[1:]).mean((1, 3, 4))
    ema = torch.zeros(w)
    for m in per_batch:
        ema = 0.9 * ema + 0.1 * m
    assert not torch.allclose(net.bn1.running_mean[row, :w], ema, atol=1e-3)


def test_recalibration_uses_no_augmentation():
    """Two calls on the same data give identical statistics: nothing random is involved."""
    net = tiny_net()
    data = synthetic_dataset(64, size=8, classes=5)
    archs = [net.space.largest()]
    recalibrate_bn(net, archs, data, 64, 32)
    first = net.bn1.running_var.clone()
    recalibrate_bn(net, archs, data, 64, 32)
    assert torch.equal(first, net.bn1.running_var)


# --------------------------------------------------------------------------- optimizer and schedule


def test_weight_decay_only_on_conv_and_linear_weights():
    net = tiny_net()
    decay, no_decay = param_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    want = {id(m.weight) for m in net.modules() if isinstance(m, SlicedConv2d | SlicedLinear)}
    assert {id(p) for p in decay["params"]} == want
    norms = {id(p) for m in net.modules() if isinstance(m, SlicedBatchNorm2d) for p in m.parameters()}
    assert norms and norms <= {id(p) for p in no_decay["params"]}
    assert id(net.fc.bias) in {id(p) for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    opt = build_optimizer(net, OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4))
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert isinstance(build_optimizer(net, OptimConfig(name="adamw", lr=1e-3)), torch.optim.AdamW)


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(
        opt, OptimConfig(lr=1.0, warmup_epochs=1, warmup_start_factor=0.1, min_lr=0.0), 30, 10
    )
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # rising warm-up
    assert lrs[10] == pytest.approx(1.0)
    for k in range(10, 30):  # closed-form cosine after warm-up
        assert lrs[k] == pytest.approx(0.5 * (1 + math.cos(math.pi * (k - 10) / 20)), abs=1e-6)


# --------------------------------------------------------------------------- config


def test_unknown_config_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        load_config(None, ["optim.lrr=0.1"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(ConfigError, match=r"'train\.epoch'; did you mean 'train\.epochs'"):
        load_config(path)
    with pytest.raises(ConfigError, match="expects float"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="train.target='ibb' is not one of"):
        load_config(None, ["train.target=ibb"])


def test_overrides_parse_yaml_values_and_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "train.static_widths=[0.35,0.5]",
            "optim.lr=1",
            "model.kwargs.drop_rate=0.2",
            "optim.clip_grad_norm=null",
        ],
    )
    assert cfg.train.static_widths == [0.35, 0.5] and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.kwargs == {"drop_rate": 0.2} and cfg.optim.clip_grad_norm is None
    assert cfg.optim.weight_decay == 5e-5
    from dynaslice.train.config import save_config

    save_config(cfg, tmp_path / "r.yaml")
    assert load_config(tmp_path / "r.yaml") == cfg


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))))
def test_presets_load(name):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
    from dynaslice.binary.train import load_binary_config
    from dynaslice.pipeline import load_run_config

    with open(path) as f:
        sections = set(yaml.safe_load(f) or {})
    # a training config, plus the section of the command the preset is for, read by its loader
    if "run" in sections:  # dynaslice run
        load_run_config(path, [])
    elif "binary" in sections:  # dynaslice binarize
        load_binary_config(path)
    else:
        load_config(path)


# --------------------------------------------------------------------------- checkpoint files


def _save(run, step, extra=None):
    tensors = {"model.w": torch.arange(6.0).view(2, 3)}
    return save_checkpoint(
        run, step, tensors, {"model": {"name": "x", "kwargs": {}}}, {"step": step, **(extra or {})}, keep=2
    )


def test_checkpoints_are_complete_pruned_and_point_to_the_latest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000002", "step-00000003"]  # no temp files left, 2 kept
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000003"
    tensors, meta = load_model_file(latest / "model.safetensors")
    assert torch.equal(tensors["model.w"], torch.arange(6.0).view(2, 3)) and meta["step"] == 3
    assert load_state(latest / "state.pt")["step"] == 3


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    import dynaslice.train.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_state", boom)
    with pytest.raises(OSError):
        _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001"]


def test_damaged_or_foreign_files_give_one_clear_error(tmp_path):
    ck = _save(tmp_path, 1)
    model, state = ck / "model.safetensors", ck / "state.pt"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged") as e:
        load_model_file(model)
    assert "\n" not in str(e.value)
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated or damaged") as e:
        load_state(state)
    assert "\n" not in str(e.value)
    # a foreign pickle: torch.load(weights_only=True) refuses it and we say so in one line
    foreign = tmp_path / "foreign.pt"
    torch.save({"obj": Arch(a=1)}, foreign)
    with pytest.raises(CheckpointError, match="never loads files that way") as e:
        load_state(foreign)
    assert "weights_only=False" not in str(e.value)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a dynaslice model file"):
        load_model_file(tmp_path / "other.safetensors")
