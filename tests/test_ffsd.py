"""FFSD and DML (dynaslice.train.ffsd): the loss terms on hand-computed cases, where gradients
go, which optimiser moves what, the leader saved alone, resume, one-line errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from test_reliability import cli, one_line_error, write_config

from dynaslice import runs, serve
from dynaslice.counting import count_module_params
from dynaslice.train import SupernetTrainer, load_config
from dynaslice.train.ffsd import (
    Decoder,
    OnlineDistillTrainer,
    attention_loss,
    attention_map,
    distill_kl,
    diversity_loss,
    diversity_target,
    run_stages,
    warmup_factor,
)

torch.set_num_threads(1)
# resnet_small on 16x16 images: stages of 16, 8, 4 and 2 pixels; 4 steps per epoch
TINY = [
    "data.name=synthetic", "data.image_size=16", "data.batch_size=8", "data.val_size=8",
    "data.synthetic_train=32", "data.synthetic_test=8", "train.epochs=2", "train.threads=1",
    "train.eval_every_epochs=0", "train.log_every_steps=1", "train.target=ffsd", "train.temperature=2.0",
    "train.label_smoothing=0.0", "train.ffsd.warmup_epochs=5", "model.kwargs={ratios: [0.5, 1.0]}",
]  # fmt: skip


def tiny(*extra: str):
    return load_config(None, [*TINY, *extra])


def batch(trainer: OnlineDistillTrainer) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(trainer.train_loader.epoch_batches(0)))


# --------------------------------------------------------------------------- the loss terms by hand


def test_kl_is_scaled_by_t_squared_and_teaches_with_a_detached_target():
    student = torch.zeros(1, 2, requires_grad=True)
    target = torch.tensor([[math.log(9.0), 0.0]], requires_grad=True)
    p = [0.75, 0.25]  # softmax([ln 9, 0] / 2) = [3, 1] / 4
    expected = 4 * sum(pi * math.log(pi / 0.5) for pi in p)
    loss = distill_kl(student, target, 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert target.grad is None and student.grad.abs().sum() > 0


def test_warmup_factor_is_the_official_exponential_on_1_based_epochs():
    assert warmup_factor(1, 5) == pytest.approx(math.exp(-5 * 0.8**2))
    assert warmup_factor(3, 5) == pytest.approx(math.exp(-5 * 0.4**2))
    assert warmup_factor(5, 5) == 1.0 and warmup_factor(6, 5) == 1.0 and warmup_factor(1, 0) == 1.0


def test_attention_map_and_loss_by_hand():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # [1, 2 channels, 1, 2]
    assert attention_map(f).flatten().tolist() == [5.0, 2.0]
    x, y = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]])
    assert attention_loss(x, y).item() == pytest.approx(((0.6 - 0) ** 2 + (0.8 - 1) ** 2) / 2)


def _shifted_by_hand(values: list[float]) -> tuple[list[float], list[float], float]:
    """The official shifted target of a 1x3 map: normalised map, target, the raw norm."""
    norm = math.sqrt(sum(v * v for v in values))
    a = [v / norm for v in values]
    threshold = sorted(a)[len(a) // 3 - 1]
    target = [(norm / 2 - ai) * ((ai > threshold) - (ai < threshold)) + norm / 2 for ai in a]
    return a, target, norm


def test_diversity_loss_by_hand_pulls_away_where_the_previous_student_looks():
    x, y = [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]
    _, target, norm = _shifted_by_hand(y)
    # above the smallest value: ||y|| - y; the smallest (the threshold itself): ||y|| / 2
    assert target == pytest.approx([norm / 2, norm - 2 / norm, norm - 3 / norm])
    xn = [v / math.sqrt(14) for v in x]
    expected = sum((a - b) ** 2 for a, b in zip(xn, target, strict=True)) / 3
    loss = diversity_loss(torch.tensor([[[x]]]), torch.tensor([[[y]]]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() > 0  # a penalty: FFSD adds it, times lambda_diversity, to the student's loss


def test_diversity_target_moves_every_channel_by_the_shifted_attention():
    y = torch.tensor([[[[1.0, 2.0, 3.0]]]])  # one channel: A(y) = y^2
    a, target, norm = _shifted_by_hand([1.0, 4.0, 9.0])
    expected = [v + (t - ai) * norm for v, t, ai in zip([1.0, 2.0, 3.0], target, a, strict=True)]
    assert diversity_target(y).flatten().tolist() == pytest.approx(expected, rel=1e-6)


def test_decoder_rebuilds_every_shallower_stage_at_its_own_size():
    shapes = [(16, 28, 28), (32, 14, 14), (64, 7, 7), (128, 4, 4)]  # resnet_small at 28x28
    out = Decoder(shapes)(torch.zeros(2, 128, 4, 4))
    assert [tuple(o.shape[1:]) for o in out] == shapes[:-1]
    with pytest.raises(ValueError, match="transposed conv"):
        Decoder([(8, 4, 4), (8, 3, 3)])


# --------------------------------------------------------------------------- the step


def test_student_loss_adds_the_warmed_up_diversity_and_self_distillation_terms(tmp_path):
    trainer = OnlineDistillTrainer(tiny("train.ffsd.lambda_diversity=0.5"), tmp_path)
    trainer.on_epoch_start(1)  # epoch 2 of a 5-epoch warm-up
    x, y = batch(trainer)
    w = math.exp(-5 * 0.6**2) * 0.5
    with torch.no_grad():
        (f0, out0), (f1, out1) = (run_stages(s.train(), x) for s in trainer.students)
        trainer.decoders[0].eval()
        rebuilt = trainer.decoders[0](diversity_target(f0[-1]))
        sd = sum(attention_loss(attention_map(f), attention_map(r)) for f, r in zip(f1, rebuilt, strict=False))
        expected = (F.cross_entropy(out1, y) + distill_kl(out1, out0, 2.0)
                    + w * (diversity_loss(attention_map(f1[-1]), attention_map(f0[-1])) + sd))  # fmt: skip
        parts = trainer.losses(x, y)
    assert parts.students[1].item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts.students[0].item() == pytest.approx((F.cross_entropy(out0, y) + distill_kl(out0, out1, 2.0)).item())


def test_each_network_gets_its_own_gradients_and_optimizer(tmp_path):
    trainer = OnlineDistillTrainer(tiny(), tmp_path)
    main = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    decoders = {id(p) for g in trainer.decoder_optimizer.param_groups for p in g["params"]}
    assert decoders == {id(p) for p in trainer.decoders.parameters()} and not decoders & main
    fusion = {id(p) for p in trainer.fusion.parameters()}
    assert fusion <= main
    decays = {g["weight_decay"] for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} & fusion}
    assert decays == {1e-5, 0.0}  # conv/linear weights at the fusion module's own decay
    for net in [*trainer.students, trainer.leader, trainer.trans_fusion]:
        assert {id(p) for p in net.parameters()} <= main

    x, y = batch(trainer)
    parts = trainer.losses(x, y)
    # the networks' losses send nothing to the decoders or the fusion module...
    (sum(parts.students) + parts.leader).backward(retain_graph=True)
    assert all(p.grad is None for p in [*trainer.decoders.parameters(), *trainer.fusion.parameters()])
    for net in [*trainer.students, trainer.leader, trainer.trans_fusion]:
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    grads = [p.grad.clone() for p in trainer.students[0].parameters()]
    # ... and the fusion module's and the decoders' losses nothing to the networks
    (parts.fusion + parts.decoders).backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, trainer.students[0].parameters(), strict=True))
    assert all(p.grad is not None for p in [*trainer.decoders.parameters(), *trainer.fusion.parameters()])


def test_a_killed_and_resumed_run_ends_identical(tmp_path):
    """Saved after 4 of 8 steps, resumed in a fresh trainer: bitwise the uninterrupted run (all
    networks, the fusion module, the decoders and their Adam state travel with the checkpoint)."""
    cfg = tiny("train.ffsd.students=2")
    whole = OnlineDistillTrainer(cfg, tmp_path / "whole")
    whole.fit()
    killed = OnlineDistillTrainer(cfg, tmp_path / "killed")
    for epoch in range(2):  # one step into the second epoch, so the warm-up factor changed
        killed.on_epoch_start(epoch)
        for x, y in itertools.islice(killed.train_loader.epoch_batches(epoch), 3 if epoch == 0 else 1):
            killed.train_step(x, y)
    killed.save()
    resumed = OnlineDistillTrainer(cfg, tmp_path / "killed")
    assert resumed.resume() and resumed.step == 4
    resumed.fit()
    for prefix, module in whole.checkpoint_modules().items():
        a, b = module.state_dict(), resumed.checkpoint_modules()[prefix].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), prefix
    a, b = whole.decoder_optimizer.state_dict()["state"], resumed.decoder_optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)


# --------------------------------------------------------------------------- the command


def test_dynaslice_train_keeps_the_leader_alone_as_a_plain_model(tmp_path):
    config = write_config(tmp_path, data={"image_size": 16}, train={"epochs": 1, "target": "ffsd", "temperature": 2.0})
    rc, out, err = cli("train", config, "--out", tmp_path / "run")
    assert rc == 0, err
    run = tmp_path / "run"
    plain = torch.load(run / runs.PRUNED_MODEL, weights_only=False).eval()
    trainer = OnlineDistillTrainer(load_config(run / runs.CONFIG), run)  # its final checkpoint
    assert trainer.resume()
    x = torch.randn(4, *trainer.input_size)
    trainer.leader.eval()
    assert torch.allclose(plain(x), run_stages(trainer.leader, x)[1], atol=1e-5)
    # the leader alone: no fusion module, no TransFusion branch, no student
    assert count_module_params(plain) == count_module_params(trainer.plain_model())
    assert not any("fusion" in k or "trans" in k for k in plain.state_dict())
    assert (run / runs.FINAL_EVAL).is_file()
    with torch.no_grad():  # and it serves like any exported network
        assert torch.allclose(torch.as_tensor(serve.load(run / runs.PRUNED_ONNX)(x)), plain(x), atol=1e-4)


def test_dml_with_one_student_is_plain_training(tmp_path):
    trainer = OnlineDistillTrainer(tiny("train.target=dml", "train.ffsd.students=1"), tmp_path)
    x, y = batch(trainer)
    parts = trainer.losses(x, y)
    with torch.no_grad():
        logits = run_stages(trainer.students[0], x)[1]
    assert parts.fusion is None and parts.students[0].item() == pytest.approx(F.cross_entropy(logits, y).item())
    assert trainer.checkpoint_modules()["model"] is trainer.students[0]


def test_a_frozen_teacher_adds_offline_kd(tmp_path):
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 10))
    trainer = OnlineDistillTrainer(tiny("train.target=dml", "train.ffsd.students=1"), tmp_path, teacher=teacher)
    x, y = batch(trainer)
    parts = trainer.losses(x, y)
    with torch.no_grad():
        logits = run_stages(trainer.students[0], x)[1]
        expected = F.cross_entropy(logits, y) + distill_kl(logits, teacher(x), 2.0)
    assert parts.students[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_a_supernet_trainer_refuses_the_whole_run_targets(tmp_path):
    with pytest.raises(ValueError, match="networks of its own"):
        SupernetTrainer(tiny(), tmp_path)


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["train.ffsd.students=0"], "at least one common student"),
        (["train.target=dml", "train.ffsd.students=-1"], "at least one common student"),
        (["model.name=vit_tiny", "model.kwargs={}"], "[B, C, H, W] feature maps"),
        (["model.gate.enabled=true"], "plain networks"),
    ],
)
def test_bad_inputs_are_one_line_before_any_work(tmp_path, sets, needle):
    config = write_config(tmp_path, data={"image_size": 16}, train={"target": "ffsd"})
    args = [a for s in sets for a in ("--set", s)]
    one_line_error(cli("train", config, "--out", tmp_path / "run", *args), needle)
    assert not (tmp_path / "run" / runs.CHECKPOINTS).exists()
