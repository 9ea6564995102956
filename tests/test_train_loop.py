"""The training loop end to end on tiny synthetic data: SIGKILL + resume is bitwise exact,
static mode trains one network per width, NaN stops cleanly, the CLI commands work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dynaslice.cli import main
from dynaslice.counting import count_macs
from dynaslice.models import create_supernet
from dynaslice.train import (
    CheckpointError,
    SupernetTrainer,
    TrainingDiverged,
    derive_seed,
    load_config,
    load_model_file,
    train,
)
from dynaslice.train.checkpoint import latest_checkpoint, load_state

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": {"kwargs": {"ratios": [0.5, 0.75, 1.0]}},
    "data": {"name": "synthetic", "image_size": 8, "batch_size": 8, "val_size": 32, "synthetic_train": 96},
    "optim": {"lr": 0.05, "warmup_epochs": 0.5},
    "train": {
        "epochs": 1,
        "threads": 1,
        "eval_every_epochs": 0,
        "eval_widths": [0.5, 1.0],
        "recal_images": 32,
        "recal_batch_size": 16,
        "ema_half_life_epochs": 0.2,
        "log_every_steps": 1,
    },
}


def tiny_config(tmp_path: Path, *overrides: str, name: str = "tiny.yaml") -> tuple[Path, object]:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(TINY))
    return path, load_config(path, list(overrides))


def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tensors_of(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_model_file(ckpt / "model.safetensors")[0]


# --------------------------------------------------------------------------- resume


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    """IEB + MvCo + dropout (every RNG consumer), checkpoints every 5 steps, 2 epochs of 12 steps."""
    sets = [
        "train.epochs=2",
        "train.target=ieb",
        "train.mvco=true",
        "train.ckpt_every_steps=5",
        "model.kwargs.drop_rate=0.2",
        "data.synthetic_train=128",
        "train.eval_widths=[1.0]",
    ]
    cfg_path, cfg = tiny_config(tmp_path)
    args = [sys.executable, "-m", "dynaslice.cli", "train", str(cfg_path)] + [
        a for s in sets for a in ("--set", s)
    ]
    total = 2 * 12

    full = tmp_path / "full"
    subprocess.run(args + ["--out", str(full)], env=cli_env(), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        args + ["--out", str(killed)], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "latest").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = load_state(latest_checkpoint(killed) / "state.pt")["step"]
    assert stopped_at < total and stopped_at % 12 != 0, stopped_at  # killed mid-epoch, mid-run

    out = subprocess.run(
        args + ["--out", str(killed), "--resume"], env=cli_env(), capture_output=True, timeout=300
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert f"resuming {killed} at step {stopped_at}" in out.stdout.decode()

    a, b = latest_checkpoint(full), latest_checkpoint(killed)
    assert a.name == b.name == f"step-{total:08d}"
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys() and any(k.startswith("ema.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    sa, sb = load_state(a / "state.pt"), load_state(b / "state.pt")
    for pid, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], sb["optimizer"]["state"][pid]["momentum_buffer"])
    assert sa["scheduler"] == sb["scheduler"]


def test_existing_run_needs_resume_and_a_matching_config(tmp_path):
    _, cfg = tiny_config(tmp_path, "train.target=labels")
    run = tmp_path / "run"
    train(cfg, run)
    with pytest.raises(CheckpointError, match="--resume"):
        train(cfg, run)
    _, other = tiny_config(tmp_path, "train.target=labels", "optim.lr=0.2")
    with pytest.raises(CheckpointError, match="optim.lr"):
        train(other, run, resume=True)
    rows = json.loads((run / "final_eval.json").read_text())
    log, recal = (run / "metrics.jsonl").read_text(), (run / "recalibrated.safetensors").stat().st_mtime_ns
    # already complete: trains nothing, re-evaluates nothing, logs nothing
    assert train(cfg, run, resume=True) == rows
    assert (run / "metrics.jsonl").read_text() == log
    assert (run / "recalibrated.safetensors").stat().st_mtime_ns == recal
    # killed during the final evaluation (no final_eval.json yet): resume redoes it, same rows
    (run / "final_eval.json").unlink()
    assert train(cfg, run, resume=True) == rows
    assert json.loads((run / "final_eval.json").read_text()) == rows


# --------------------------------------------------------------------------- static counterparts


def test_static_mode_trains_one_ordinary_network_per_width(tmp_path):
    _, cfg = tiny_config(tmp_path, "train.static_widths=[0.5,1.0]", "optim.weight_decay=0")
    rows = train(cfg, tmp_path / "static")
    assert [r["name"] for r in rows] == ["x0.5", "x1"]
    torch.manual_seed(derive_seed("init", cfg.train.seed))
    init = create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=8, ratios=[0.5, 0.75, 1.0])
    for width, row in zip((0.5, 1.0), rows, strict=True):
        run = tmp_path / "static" / f"static-x{width:g}"
        tensors, meta = load_model_file(latest_checkpoint(run) / "model.safetensors")
        assert meta["config"]["train"]["sampler"] == "fixed" and meta["config"]["train"]["target"] == "labels"
        arch = init.space.uniform(width)
        assert row["macs"] == count_macs(init, arch)
        w = arch["s1"]
        trained, start = tensors["model.conv1.weight"], init.conv1.weight.detach()
        assert not torch.equal(trained[:w], start[:w])  # the network of this width learned
        assert torch.equal(trained[w:], start[w:])  # nothing outside it: an ordinary narrow net
        assert not any(k.startswith("ema.") for k in tensors)
    assert json.loads((tmp_path / "static" / "final_eval.json").read_text()) == rows


# --------------------------------------------------------------------------- step mechanics


def test_nan_loss_stops_without_stepping_and_keeps_the_checkpoint(tmp_path):
    _, cfg = tiny_config(tmp_path)
    trainer = SupernetTrainer(cfg, tmp_path / "run")
    trainer.save()
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    x, y = next(trainer.train_loader.epoch_batches(0))
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        trainer.train_step(x, y)
    assert trainer.step == 0 and latest_checkpoint(tmp_path / "run").name == "step-00000000"
    after = trainer.net.state_dict()
    assert all(
        torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k
    )


def test_dropout_runs_in_the_largest_subnet_only(tmp_path):
    _, cfg = tiny_config(tmp_path, "model.kwargs.drop_rate=0.5", "train.target=inplace")
    trainer = SupernetTrainer(cfg, tmp_path / "run")
    seen = []
    trainer.net.dropout.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    x, y = next(trainer.train_loader.epoch_batches(0))
    out = trainer.train_step(x, y)
    assert out["archs"][0] == trainer.space.largest()
    assert seen == [True, False, False, False]
    assert trainer.net.dropout.training  # restored


def test_sandwich_step_runs_the_sampled_archs_and_learns(tmp_path):
    _, cfg = tiny_config(tmp_path, "train.target=ib", "train.epochs=3", "optim.lr=0.1")
    trainer = SupernetTrainer(cfg, tmp_path / "run")
    first = [trainer.train_step(*b)["losses"] for b in trainer.train_loader.epoch_batches(0)]
    assert len(first[0]) == 4
    for epoch in (1, 2):
        last = [trainer.train_step(*b)["losses"] for b in trainer.train_loader.epoch_batches(epoch)]
    assert sum(map(sum, last)) < sum(map(sum, first))
    assert int(trainer.ema.n_averaged) == trainer.step == 3 * trainer.steps_per_epoch


def test_an_ema_teacher_that_lags_by_epochs_is_noted(tmp_path, capsys):
    # 0.997 per step on 8 steps per epoch: a half-life of ~29 epochs
    SupernetTrainer(tiny_config(tmp_path, "train.ema_half_life_epochs=0")[1], tmp_path / "a")
    assert "the EMA teacher's half-life is 29 epochs" in capsys.readouterr().err
    SupernetTrainer(tiny_config(tmp_path, "train.ema_half_life_epochs=0.2")[1], tmp_path / "b")
    SupernetTrainer(tiny_config(tmp_path, "train.ema_half_life_epochs=0", "train.target=labels")[1], tmp_path / "c")
    assert "half-life" not in capsys.readouterr().err  # a short horizon, or no EMA teacher at all


@pytest.mark.parametrize("key", ["clip_grad_norm", "clip_grad_value"])
def test_grad_clipping_bounds_the_update(tmp_path, key):
    clip, lr = (1e-6 if key == "clip_grad_norm" else 1e-3), 0.05
    _, cfg = tiny_config(
        tmp_path,
        f"optim.{key}={clip}",
        "optim.weight_decay=0",
        "optim.warmup_epochs=0",
        f"optim.lr={lr}",
    )
    trainer = SupernetTrainer(cfg, tmp_path / "run")
    before = [p.detach().clone() for p in trainer.net.parameters()]
    out = trainer.train_step(*next(trainer.train_loader.epoch_batches(0)))
    change = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(trainer.net.parameters(), before, strict=True)]
    )
    # first Nesterov step: update = lr * (1 + momentum) * clipped gradient
    bound = change.norm() if key == "clip_grad_norm" else change.abs().max()
    slack = 1.001 if key == "clip_grad_norm" else 1.01  # by value: float32 rounding (~1e-7) of a 1e-4 step
    assert 0 < float(bound) <= lr * 1.9 * clip * slack
    # the norm before clipping is reported (and logged), so a user sees how often the clip bites
    assert ("grad_norm" in out) == (key == "clip_grad_norm")
    if key == "clip_grad_norm":
        assert float(out["grad_norm"]) > 1000 * clip


def test_clipped_run_logs_the_gradient_norm(tmp_path):
    _, cfg = tiny_config(tmp_path, "optim.clip_grad_norm=1.0", "train.log_every_steps=1")
    train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in records if "step" in r and "loss" in r]
    assert norms and all(isinstance(n, float) and n > 0 for n in norms)


# --------------------------------------------------------------------------- commands


def test_cli_train_eval_recalibrate(tmp_path, capsys):
    cfg_path, _ = tiny_config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(cfg_path), "--out", str(run), "--set", "train.target=labels"]) == 0
    assert (run / "config.yaml").is_file() and (run / "recalibrated.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and "val" in records[-1]

    report = tmp_path / "eval.json"
    assert (
        main(["eval", str(run), "--split", "val", "--archs", "x0.5", "largest", "--json", str(report)]) == 0
    )
    rows = json.loads(report.read_text())["rows"]
    assert [r["name"] for r in rows] == ["x0.5", "largest"] and rows[0]["images"] == 32
    assert rows[0]["macs"] < rows[1]["macs"]
    assert "BN recalibrated now" in capsys.readouterr().out

    assert main(["recalibrate", str(run), "--archs", "x0.5", "--out", str(tmp_path / "r.safetensors")]) == 0
    assert main(["eval", str(tmp_path / "r.safetensors"), "--split", "val", "--archs", "x0.5"]) == 0
    assert "BN statistics from the file" in capsys.readouterr().out

    # a damaged checkpoint and an unknown config key: one line on stderr, exit code 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((run / "recalibrated.safetensors").read_bytes()[:100])
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated or damaged" in err
    assert main(["train", str(cfg_path), "--set", "optim.momentun=0.8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'optim.momentum'" in err


# --------------------------------------------------------------------------- plain modules on the engine


def test_model_trainer_trains_a_plain_module_with_epoch_hooks_and_resumes(tmp_path):
    from torch import nn

    from dynaslice.train import ModelTrainer

    class Recorded(ModelTrainer):
        def on_epoch_start(self, epoch):
            self.epochs_started.append(epoch)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    _, cfg = tiny_config(tmp_path, "train.epochs=2")
    trainer = Recorded(make(), cfg, tmp_path / "run")
    trainer.epochs_started = []
    result = trainer.fit()
    assert trainer.epochs_started == [0, 1] and trainer.step == trainer.total_steps
    assert 0 <= result["accuracy"] <= 100 and result["images"] == 32
    assert json.loads((tmp_path / "run" / "final_eval.json").read_text()) == result
    again = Recorded(make(), cfg, tmp_path / "run")
    again.epochs_started = []
    assert again.resume() and again.step == trainer.step
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), trainer.model.state_dict().values(), strict=True))
    assert again.fit() == result and again.epochs_started == []  # finished: nothing trains again


# --------------------------------------------------------------------------- two phases in one run


def test_phase1_then_supernet_in_one_run_resumes_bit_for_bit(tmp_path):
    """train.phase1_epochs: the largest alone first (RUN/phase1), then the supernet from it with a
    frozen teacher and ordered channels; a run interrupted in phase 2 resumes to the same end."""
    from dynaslice.train.supernet import SupernetTrainer, phase1_config, phase2_config

    sets = ["train.epochs=2", "train.phase1_epochs=1", "train.target=teacher", "train.order_channels=true",
            "train.eval_widths=[0.5,1.0]"]  # fmt: skip
    _, cfg = tiny_config(tmp_path, *sets)
    full = tmp_path / "full"
    rows = train(cfg, full)
    assert (full / "phase1" / "final_eval.json").is_file() and {r["name"] for r in rows} == {"x0.5", "x1"}
    p1 = load_model_file(full / "phase1" / "recalibrated.safetensors")[1]
    assert p1["config"]["train"]["sampler"] == "fixed" and p1["config"]["train"]["epochs"] == 1

    part = tmp_path / "part"
    train(phase1_config(cfg), part / "phase1")  # phase 1 alone (what train() runs first)
    trainer = SupernetTrainer(phase2_config(cfg, part / "phase1"), part)
    for x, y in list(trainer.train_loader.epoch_batches(0))[:3]:
        trainer.train_step(x, y)
    trainer.save()  # killed after 3 steps of phase 2
    with pytest.raises(CheckpointError, match="--resume"):
        train(cfg, part)
    train(cfg, part, resume=True)
    ta, tb = tensors_of(latest_checkpoint(full)), tensors_of(latest_checkpoint(part))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_model_trainer_stops_within_the_last_epoch_for_fractional_epochs(tmp_path):
    """1.5 epochs of 8 steps: 12 steps, the schedule annealed over exactly those, then the
    half epoch's end saved (pruning fine-tunes for fractions of an epoch)."""
    from torch import nn

    from dynaslice.train import ModelTrainer

    _, cfg = tiny_config(tmp_path, "optim.warmup_epochs=0")
    torch.manual_seed(0)
    trainer = ModelTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), cfg, tmp_path / "run", epochs=1.5)
    assert trainer.steps_per_epoch == 8 and trainer.total_steps == 12 and trainer.epochs == 2
    trainer.fit()
    assert trainer.step == 12 and trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    assert latest_checkpoint(tmp_path / "run").name == "step-00000012"


# --------------------------------------------------------------------------- progress (issue 33 item 5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_a_log_file_prints_a_line_every_interval():
    """Not a terminal: a plain line every `interval` seconds of the (injected) clock, with
    done/total, rate, ETA and the loss; nothing for work that ends within the first interval."""
    import io

    from dynaslice.progress import Progress

    clock, out = FakeClock(), io.StringIO()
    with Progress(10, "stage1 epoch 1/3", clock=clock, interval=10, stream=out) as bar:
        for i in range(9):
            clock.now += 4.0  # 4 s per step: a line at 12 s, 24 s, 36 s
            bar.update(loss=1.0 / (i + 1))
    lines = out.getvalue().splitlines()
    assert lines == [
        "stage1 epoch 1/3: 3/10 steps (30%), 4 s/step, ETA 28s, loss 0.3333",
        "stage1 epoch 1/3: 6/10 steps (60%), 4 s/step, ETA 16s, loss 0.1667",
        "stage1 epoch 1/3: 9/10 steps (90%), 4 s/step, ETA 4s, loss 0.1111",
    ]
    quick = io.StringIO()
    with Progress(100, "eval", clock=FakeClock(), interval=10, stream=quick) as bar:
        bar.update(100)
    assert quick.getvalue() == ""


def test_progress_interval_from_the_environment(monkeypatch):
    from dynaslice.progress import default_interval

    monkeypatch.setenv("DYNASLICE_PROGRESS_SECONDS", "2.5")
    assert default_interval() == 2.5
    monkeypatch.setenv("DYNASLICE_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="DYNASLICE_PROGRESS_SECONDS"):
        default_interval()


def test_training_redirected_to_a_file_prints_progress_lines(tmp_path, capsys, monkeypatch):
    """stderr is not a terminal here (captured): training still says how far it is, per step
    with the interval at 0 (the default, 10 s, would print nothing in a run this short)."""
    monkeypatch.setenv("DYNASLICE_PROGRESS_SECONDS", "0")
    cfg_path, _ = tiny_config(tmp_path)
    assert main(["train", str(cfg_path), "--out", str(tmp_path / "run"), "--set", "train.target=labels"]) == 0
    err = capsys.readouterr().err
    steps = [line for line in err.splitlines() if line.startswith("train epoch 1/1: ")]
    assert len(steps) == 7  # 8 steps; the last is the epoch's own summary line
    assert steps[0].startswith("train epoch 1/1: 1/8 steps (12%), ")
    assert "ETA" in steps[0] and "loss" in steps[0]
    assert "\r" not in err  # no terminal bar redrawn into the file
    assert "BN recalibration: 1/" in err and "eval: 1/2 batches" in err  # what follows the last epoch


def test_phase2_says_where_it_starts_and_why_its_loss_differs(tmp_path, capsys):
    sets = ["train.epochs=2", "train.phase1_epochs=1", "train.target=teacher", "train.eval_widths=[1.0]"]
    _, cfg = tiny_config(tmp_path, *sets)
    train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("phase 2:")]
    assert str(tmp_path / "run" / "phase1") in line and "not comparable with phase 1's" in line
    assert "train.init_from" not in out  # the user never set it


def test_a_pipeline_step_of_short_parts_is_not_silent_in_a_log(tmp_path, capsys, monkeypatch):
    """Each part of a step (the latency step: preparing, then timing) may end within the interval,
    so its own bar prints nothing; the step's heartbeat still says it runs (demo: 12.8 s silent)."""
    from dynaslice import pipeline

    def slow_step(run_dir, cfg, run):
        time.sleep(0.35)  # three parts of ~0.12 s: each under the interval

    monkeypatch.setenv("DYNASLICE_PROGRESS_SECONDS", "0.1")
    monkeypatch.setattr(pipeline, "steps", lambda run: [("latency", slow_step)])
    pipeline._run_steps(tmp_path, None, None, None)
    beats = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[latency] still running")]
    assert len(beats) >= 2
