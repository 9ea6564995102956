"""Reliability and security (issue 17): every mistake is one line and exit code 2, nothing is
left half-written, no file makes dynaslice run code, damage is always detected, one writer per run.

The cases run the ``dynaslice`` command in this process (``main(argv)``: an exception escaping it
would be a traceback for the user) on tiny synthetic runs; a second process is used where the case
is about processes (the run-directory lock, SIGKILL). ``test_config_fuzz`` draws config keys from
the config dataclasses and hostile values from a seeded generator.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pickle
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dynaslice import runs
from dynaslice.cli import main
from dynaslice.data import DatasetError, load_dataset
from dynaslice.modelfile import CheckpointError, load_model_file, save_model_file
from dynaslice.train import SupernetTrainer, TrainingDiverged, load_config
from dynaslice.train.checkpoint import load_checkpoint, load_resumable
from dynaslice.train.config import Config, flatten

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

# 4 steps per epoch (32 training images, batches of 8), a checkpoint every step, no evaluation
# at the end (eval_widths []: the MAC model of a fresh net costs seconds), so a run takes ~1 s.
FAST = {
    "model": {"kwargs": {"ratios": [0.5, 0.75, 1.0]}},
    "data": {"name": "synthetic", "image_size": 8, "batch_size": 8, "val_size": 8, "synthetic_train": 40,
             "synthetic_test": 16},
    "optim": {"lr": 0.05, "warmup_epochs": 0.5},
    "train": {"epochs": 1, "threads": 1, "target": "labels", "eval_every_epochs": 0, "eval_widths": [],
              "recal_images": 8, "recal_batch_size": 8, "log_every_steps": 1, "ckpt_every_steps": 1,
              "keep_checkpoints": 3},
}  # fmt: skip


def write_config(folder: Path, name: str = "fast.yaml", **sections: dict) -> Path:
    data = {k: dict(v) for k, v in FAST.items()}
    for key, values in sections.items():
        data[key] = {**data.get(key, {}), **values}
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail a case that runs longer than ``seconds`` (a hang) instead of waiting forever."""

    def hung(*_):
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cli(*argv: object, seconds: int = 120) -> tuple[int, str, str]:
    """``dynaslice ARGV`` in this process: ``(exit code, stdout, stderr)``. An exception that
    escapes ``main`` (a traceback for the user) fails the test right here."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with deadline(seconds), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    torch.set_num_threads(threads)  # train.threads sets it for the process
    return rc, out.getvalue(), err.getvalue()


def one_line_error(result: tuple[int, str, str], *needles: str) -> str:
    """Assert exit code 2 and exactly one error line on stderr (notes aside); return it."""
    rc, _, err = result
    lines = [line for line in err.splitlines() if not line.startswith(("note:", "warning:"))]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> Path:
    """A finished tiny run: checkpoints at steps 2, 3 and 4 (the last), config, metrics."""
    folder = tmp_path_factory.mktemp("fast")
    run = folder / "run"
    rc, _, err = cli("train", write_config(folder), "--out", run)
    assert rc == 0, err
    assert [p.name for p in runs.checkpoint_steps(run)] == [runs.checkpoint_name(s) for s in (2, 3, 4)]
    return run


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# --------------------------------------------------------------------------- data never runs code


class _Payload:
    """What an attacker puts in a "CIFAR batch": unpickling it would create ``marker``."""

    def __init__(self, how: str, marker: Path):
        self.how, self.marker = how, marker

    def __reduce__(self):
        if self.how == "open":
            return open, (str(self.marker), "w")
        return os.system, (f"touch {self.marker}",)


def crafted_cifar(folder: Path, how: str, marker: Path) -> Path:
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    payload = {"data": _Payload(how, marker), "labels": [0]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(pickle.dumps(payload, protocol=2))
    return folder


@pytest.mark.parametrize("how", ["open", "system"])
def test_a_crafted_cifar_pickle_runs_nothing(tmp_path, fast_run, how):
    marker = tmp_path / "pwned"
    root = crafted_cifar(tmp_path / "data", how, marker)
    with pytest.raises(DatasetError, match="refused, nothing was run") as e:
        load_dataset("cifar10", root=root)
    assert "\n" not in str(e.value) and "data_batch_1" in str(e.value)
    assert not marker.exists()

    # a shared model file whose config names that folder: eval never reads data.root from it ...
    tensors, meta = load_model_file(runs.latest_pointer(fast_run) / runs.MODEL_FILE)
    meta["config"]["data"].update(name="cifar10", root=str(root))
    shared = tmp_path / "shared.safetensors"
    save_model_file(shared, tensors, {k: v for k, v in meta.items() if k not in ("format", "version")})
    line = one_line_error(cli("eval", shared, "--archs", "largest"), "not found")
    assert str(root) not in line and "--data-dir" in line
    # ... and even when the user points --data-dir at it, the batch files are parsed, not run
    one_line_error(cli("eval", shared, "--archs", "largest", "--data-dir", root), "refused, nothing was run")
    one_line_error(cli("recalibrate", shared, "--data-dir", root, "--out", tmp_path / "r.st"), "nothing was run")
    assert not marker.exists()


def _cifar_pickle(protocol: int, data: np.ndarray, labels: list[int], numpy1_names: bool = False) -> bytes:
    raw = pickle.dumps({"batch_label": "b", "labels": labels, "data": data, "filenames": ["a.png"]}, protocol)
    if numpy1_names:  # how the official files (numpy 1, protocol 2) name the array rebuilder
        assert b"numpy._core.multiarray\n" in raw
        raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    return raw


@pytest.mark.parametrize("protocol,numpy1_names", [(2, True), (2, False), (4, False), (5, False)])
def test_cifar_batches_load_without_pickle_load(tmp_path, protocol, numpy1_names):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 2).tolist()
        (folder / name).write_bytes(_cifar_pickle(protocol, data, labels, numpy1_names))
        expected.append((data, labels))
    ds = load_dataset("cifar10", root=tmp_path)
    assert torch.equal(ds.images, torch.from_numpy(np.concatenate([d for d, _ in expected[:5]])).view(-1, 3, 32, 32))
    assert ds.labels.tolist() == sum((lab for _, lab in expected[:5]), [])


def test_cifar_batches_of_python_objects_are_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    objects = np.array([1, "x"] * 1536, dtype=object).reshape(1, 3072)
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({"data": objects, "fine_labels": [1]}))
    with pytest.raises(DatasetError, match="array of Python objects"):
        load_dataset("cifar100", root=tmp_path)
    (folder / "train").write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "fine_labels": ["x"]}))
    with pytest.raises(DatasetError, match="labels that are not integers"):
        load_dataset("cifar100", root=tmp_path)
    (folder / "train").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DatasetError, match="not a CIFAR batch"):
        load_dataset("cifar100", root=tmp_path)


# --------------------------------------------------------------------------- values checked up front

BAD_VALUES = [
    # (overrides, what the one line must say)
    (["train.recal_images=0"], "train.recal_images=0"),
    (["optim.lr=1e300"], "beyond float32"),  # finite in float64, an overflow traceback in SGD's step (fuzz, 400 cases)
    (["train.recal_batch_size=1"], "BatchNorm statistics need two or more images"),
    (["data.batch_size=1"], "data.batch_size=1"),
    (["train.log_every_steps=0"], "train.log_every_steps=0"),
    (["train.threads=-1"], "train.threads=-1"),
    (["train.threads=100000"], "train.threads=100000"),
    (["data.image_size=0"], "data.image_size=0"),
    (["model.name=vit_small_input", "model.kwargs={input_size: 12}"], "cannot run on 1x8x8 images"),
    (["model.kwargs.num_classes=5"], "contradict the data (1 channels, 10 classes)"),
    (["model.kwargs.in_chans=3"], "contradict the data"),
    (["model.kwargs.foo=1"], "model.kwargs"),
    (["optim.lr=.nan"], "optim.lr"),
    (["optim.lr=.inf"], "optim.lr"),
    (["optim.lr=1e400"], "finite"),
    (["optim.momentum=nan"], "finite"),
    (["train.eval_widths=[.nan]"], "finite"),
    (["data.val_size=-5"], "data.val_size=-5"),
    (["data.train_size=-5"], "data.train_size=-5"),
    (["data.train_size=100000"], "data.train_size=100000 is more than the 32 training images"),
    (["data.val_size=40"], "data.val_size=40 leaves no training images: the synthetic training split has 40"),
    (["train.ckpt_every_steps=-1"], "train.ckpt_every_steps=-1"),
    (["train.num_subnets=100000"], "train.num_subnets=100000"),
    (["train.sampler=pss", "data.val_size=0"], "validation split"),
    (["train.eval_widths=[0.01]"], "train.eval_widths=[0.01]"),
    (["train.static_widths=[0.5,0.01]"], "train.static_widths=[0.5, 0.01]"),
    (["train.fixed_width=0.01", "train.sampler=fixed"], "0.01"),
    (["data.synthetic_classes=0"], "data.synthetic_classes=0"),
    (["data.synthetic_train=100000000"], "GiB of synthetic images"),
    (["data.crop_padding=100"], "data.crop_padding=100"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs=-1"),
    (["optim.warmup_epochs=5"], "longer than train.epochs"),
    (["optim.weight_decay=-1"], "optim.weight_decay=-1"),
    (["optim.min_lr=1"], "optim.min_lr"),
    (["optim.momentum=0"], "nesterov"),
    (["optim.betas=[2]"], "optim.betas"),
    (["train.label_smoothing=2"], "train.label_smoothing=2"),
    (["train.eval_every_epochs=-1"], "train.eval_every_epochs=-1"),
    (["train.ema_half_life_epochs=-1"], "train.ema_half_life_epochs=-1"),
    (["stage2.target_macs=1.5"], "stage2.target_macs=1.5"),
    (["model.gate.pre_gate={s1: x}"], "model.gate.pre_gate.s1"),
    (["train=[1, 2]"], "config section train must be a mapping"),
    (["optim=3"], "config section optim must be a mapping"),
    (["model.kwargs=[1]"], "model.kwargs"),
    (["data.name=fashion_mnist", "data.root=/nonexistent"], "--set data.root=DIR"),
    (["run.gate_targets=[0.5]"], "belong to dynaslice run"),
]


@pytest.mark.parametrize("overrides,needle", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_fail_before_anything_is_written(tmp_path, overrides, needle):
    out = tmp_path / "run"
    args = [a for o in overrides for a in ("--set", o)]
    line = one_line_error(cli("train", write_config(tmp_path), "--out", out, *args), needle)
    assert "--data-dir" not in line  # train has no such flag
    assert not out.exists()


@pytest.mark.parametrize(
    "text,needle",
    [
        (b"- 1\n- 2\n", "must hold a mapping"),
        (b"train: [1]\n", "config section train must be a mapping"),
        (b"optim:\n  lr: [0.1\n", "not valid YAML"),
        (b"\xff\xfe\x00garbage", "not a text (UTF-8) YAML file"),
        (b"run: 3\n", None),  # a `dynaslice run` section is ignored by train (with a note)...
    ],
)
def test_config_files_of_the_wrong_shape(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    if needle is None:
        result = cli("run", path, "--out", tmp_path / "run")  # ... but `dynaslice run` reads it
        one_line_error(result, "config section run must be a mapping")
        return
    line = one_line_error(cli("train", path, "--out", tmp_path / "run"), needle)
    assert str(path) in line and not (tmp_path / "run").exists()


def test_train_on_a_run_config_ignores_its_run_section_with_a_note(tmp_path):
    path = write_config(tmp_path, run={"gate_targets": [0.5]})
    rc, _, err = cli("train", path, "--out", tmp_path / "run")
    assert rc == 0 and "note:" in err and "ignores it" in err
    assert "run" not in yaml.safe_load((tmp_path / "run" / runs.CONFIG).read_text())


# --------------------------------------------------------------------------- output paths


def test_output_path_mistakes_are_one_line_and_leave_nothing(tmp_path, fast_run):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    config = write_config(tmp_path)
    gated = write_config(tmp_path, "gated.yaml", model={"gate": {"enabled": True, "routes": 3}})
    before = listing(tmp_path)
    cases = [
        (["train", config, "--out", a_file], "is a file"),
        (["train", config, "--out", a_file / "run"], "is a file, not a directory"),
        (["eval", fast_run, "--json", folder], "is a directory"),
        (["eval", fast_run, "--json", a_file / "x.json"], "is a file, not a directory"),
        (["export", fast_run, "--arch", "largest", "--out", folder], "is a directory"),
        (["export", fast_run, "--arch", "largest", "--out", a_file / "x.onnx"], "is a file, not a directory"),
        (["recalibrate", fast_run, "--out", folder], "is a directory"),
        (["recalibrate", fast_run, "--out", a_file], "exists: pass --force"),
        (["profile", "resnet_small", "--no-latency", "--json", folder], "is a directory"),
        (["select", fast_run, "--max-macs", "1M", "--export", a_file / "x.pt"], "is a file, not a directory"),
        (["train-gate", fast_run, "--out", a_file], ""),  # (refused first: the run is not gated)
        (["run", gated, "--out", a_file], "is a file"),
        (["run", gated, "--out", a_file / "run"], "is a file, not a directory"),
    ]
    for argv, needle in cases:
        one_line_error(cli(*argv), needle)
    assert listing(tmp_path) == before and a_file.read_text() == "keep me"


def test_unwritable_places_are_named(tmp_path, fast_run):
    # /proc takes no new files, even for root; the message names the file asked for
    line = one_line_error(cli("recalibrate", fast_run, "--archs", "largest", "--out", "/proc/x.safetensors"))
    assert "/proc/x.safetensors" in line and ".tmp" not in line
    if os.geteuid() == 0:
        return  # permissions do not stop root
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    one_line_error(cli("eval", fast_run, "--json", locked / "x.json"), "not writable")
    one_line_error(cli("train", write_config(tmp_path), "--out", locked / "run"), "not writable")


SUBCOMMAND_MISTAKES = [
    "eval {run} --archs x0", "eval {run} --archs xnan", "eval {run} --archs x1e400", "eval {run} --archs abc",
    "eval {run} --archs {tmp}/bin.json", "eval {run} --archs {tmp}/ints.json", "eval {run} --archs {tmp}/arch.json",
    "eval {run} --archs {tmp}/missing.json", "eval {run} --split foo", "eval {run} --weights ema", "eval {tmp}/nope",
    "eval {tmp}/bin.json", "eval {tmp}", "eval {run} --archs routes",
    "recalibrate {run} --images 0", "recalibrate {run} --images abc", "recalibrate {run} --archs routes",
    "export {run} --arch x0 --out {tmp}/a.pt", "export {run} --arch route9 --out {tmp}/a.pt",
    "export {run} --arch {{bad --out {tmp}/a.pt", "export {run} --arch {tmp}/arch.json --out {tmp}/a.pt",
    "export {run} --budget-macs 0 --out {tmp}/a.pt", "export {run} --budget-macs nan --out {tmp}/a.pt",
    "export {run} --budget-macs 1M --out {tmp}/a.pt", "export {run} --gated --out {tmp}/pkg", "export {run} --arch x0.5",
    "select {run} --max-macs 0", "select {run} --max-macs inf", "select {run}", "select {tmp}/bin.json --max-macs 1M",
    "profile resnet_small --input-size 0 1 1", "profile resnet_small --num-classes 0", "profile resnet_small --repeats 0",
    "profile resnet_small --latency-table {tmp}/t.json --grid-values 1", "profile resnet5O",
    "profile vit_small_input --input-size 1 6 6 --no-latency",
    "train-gate {run}", "train-gate {run} --target-macs nan", "train-gate {run} --epochs 0",
    "run {tmp}/bin.json", "run {tmp}/nope.yaml", "train nonexistent_preset", "demo --data-dir /nonexistent --out {tmp}/d",
    "prune foo --out {tmp}/p", "prune l1 --target-macs 0 --out {tmp}/p", "prune l1 --target-macs abc --out {tmp}/p",
    "prune l1 --target-params -1 --out {tmp}/p", "prune l1 --target-macs 0.5 --target-params 0.5 --out {tmp}/p",
    "prune l1 --config {tmp}/bin.json --target-macs 0.5 --out {tmp}/p", "prune l1 --out {tmp}/p",
    "prune l1 --set prune.sparsity=2 --target-macs 0.5 --out {tmp}/p",
    "prune l1 --set prune.finetune_epochs=abc --target-macs 0.5 --out {tmp}/p",
    "prune l1 --target-macs 1k --out {tmp}/p",  # unreachable: refused before training, no empty run left
    "quantize {tmp}/nope.onnx --calibration real --out {tmp}/q.onnx",
    "quantize {tmp}/bin.json --calibration real --out {tmp}/q.onnx",
    "quantize {run} --calibration real --out {tmp}/q.onnx", "quantize {tmp}/bin.json --calibration foo --out {tmp}/q.onnx",
    "quantize {tmp}/bin.json --calibration real --images 0 --out {tmp}/q.onnx",
]  # fmt: skip


def test_every_subcommand_refuses_bad_arguments_in_one_line(tmp_path, fast_run):
    (tmp_path / "bin.json").write_bytes(b"\xff\x00")
    (tmp_path / "ints.json").write_text("[1, 2]")
    (tmp_path / "arch.json").write_text('{"s1": 3}')
    before = listing(tmp_path)
    for case in SUBCOMMAND_MISTAKES:
        one_line_error(cli(*case.format(run=fast_run, tmp=tmp_path).split()))
    assert listing(tmp_path) == before  # nothing written, nothing half-written


# The benchmarks' own flags: a bad one stops the script at once, in one line, before any work.
BENCH_MISTAKES = [
    ("bench_pss.py", "--sandwich {tmp}/nope --runs {tmp}/r --out {tmp}/o.json", "not a finished run"),
    ("bench_pss.py", "--recipe foo --out {tmp}/o.json", "invalid choice"),
    ("bench_accuracy.py", "compare {tmp}/nope.json {tmp}/b.json --out {tmp}/c.json", "not a bench_accuracy.py result"),
    ("bench_accuracy.py", "compare {tmp}/bin.json {tmp}/b.json --out {tmp}/c.json", "not a bench_accuracy.py result"),
    ("bench_accuracy.py", "compare {tmp}/a.json {tmp}/b.json --out {tmp}/c.json", "share no seed"),
    ("bench_accuracy.py", "summary {tmp}/nope.json --out {tmp}/s.json", "not a bench_accuracy.py result"),
    ("bench_accuracy.py", "--epochs 2 --phase1 1 --runs {tmp}/r --out {tmp}/o.json", "leaves phase 2 no epoch"),
    ("bench_accuracy.py", "--epochs 2 --from-static --phase1 0.9 --runs {tmp}/r --out {tmp}/o.json", "leaves phase 2 no epoch"),
    ("bench_accuracy.py", "--epochs 2 --from-static --phase1-set a=1 --runs {tmp}/r --out {tmp}/o.json", "needs a phase 1"),
    ("bench_accuracy.py", "--recipe ib --phase1-set a=1 --runs {tmp}/r --out {tmp}/o.json", "needs a phase 1"),
    ("bench_accuracy.py", "--phase1-set train.zero_init=1 --runs {tmp}/r --out {tmp}/o.json", "did you mean 'train.zero_init_last_bn'"),
    ("bench_accuracy.py", "--recipe-set optim.lr=fast --runs {tmp}/r --out {tmp}/o.json", "expects float"),
    ("bench_accuracy.py", "--set optim.clip_grad_value=-1 --runs {tmp}/r --out {tmp}/o.json", "use a value > 0"),
    ("bench_accuracy.py", "--config {tmp}/nope.yaml --runs {tmp}/r --out {tmp}/o.json", "not found"),
    ("bench_accuracy.py", "gated {tmp} --static {tmp}/a.json --out {tmp}/g.json", "has no networks alone"),
    ("bench_accuracy.py", "gate-init {tmp}/nope --scales 1.0", "a sigmoid never reaches 1"),
    ("bench_accuracy.py", "gate-init {tmp}/nope", "not found"),
    ("bench_accuracy.py", "ordering {tmp}/nope", "not found"),
    ("bench_quant.py", "--mode packages --run {tmp}/nope --out {tmp}/q.json", "needs --gated-package"),
    ("bench_serving.py", "--runtimes eager,nope --out {tmp}/s.json", "unknown runtime"),
    ("bench_serving.py", "--device tpu --out {tmp}/s.json", "invalid choice"),
    ("bench_coverage.py", "--tools dynaslice,nope --cache {tmp}/c --out {tmp}/c.json", "unknown tool 'nope'"),
    ("bench_coverage.py", "--models timm/nope --tools dynaslice --cache {tmp}/c --out {tmp}/c.json", "unknown model"),
]  # fmt: skip
if not torch.cuda.is_available():  # what a CPU-only machine (CI) answers to the GPU check's flags
    BENCH_MISTAKES += [
        ("bench_serving.py", "--device cuda --out {tmp}/s.json", "no CUDA device"),
        ("bench_serving.py", "--runtimes cudagraph --out {tmp}/s.json", "needs a CUDA device"),
    ]


@pytest.mark.parametrize("script, args, needle", BENCH_MISTAKES)
def test_benchmark_flags_refuse_bad_input_in_one_line(tmp_path, script, args, needle):
    (tmp_path / "bin.json").write_bytes(b"\xff\x00")
    for name, seed in (("a", 0), ("b", 1)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"seeds": [{"seed": seed}]}))
    before = listing(tmp_path)
    argv = [sys.executable, str(ROOT / "bench" / script), *args.format(tmp=tmp_path).split()]
    proc = subprocess.run(argv, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert listing(tmp_path) == before


def test_recalibrate_refuses_to_overwrite_without_force(tmp_path, fast_run):
    out = tmp_path / "r.safetensors"
    assert cli("recalibrate", fast_run, "--archs", "largest", "--out", out)[0] == 0
    stamp = out.stat().st_mtime_ns
    one_line_error(cli("recalibrate", fast_run, "--archs", "x0.5", "--out", out), "--force")
    assert out.stat().st_mtime_ns == stamp
    assert cli("recalibrate", fast_run, "--archs", "x0.5", "--out", out, "--force")[0] == 0
    assert load_model_file(out)[1]["recalibrated"].keys() == {"x0.5"}


def test_directories_follow_the_umask(fast_run):
    mask = os.umask(0)
    os.umask(mask)
    step = runs.checkpoint_steps(fast_run)[-1]
    assert step.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (step / runs.MODEL_FILE).stat().st_mode & 0o777 == 0o666 & ~mask


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe\x00", b"[]", b'{"entries": [1]}', b'{"entries": [{"bucket": "x"}]}', b'{"entries": "x"}'],
)
def test_damaged_budget_tables_are_one_line(tmp_path, content):
    (tmp_path / runs.BUDGET_TABLE).write_bytes(content)
    one_line_error(cli("select", tmp_path, "--max-macs", "1M"), str(tmp_path / runs.BUDGET_TABLE))


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe\x00", b"[]", b'{"format": "dynaslice-latency-table", "blocks": [1], "overhead_ms": 0}',
     b'{"format": "dynaslice-latency-table", "blocks": [], "overhead_ms": NaN}', None],
)  # fmt: skip
def test_damaged_latency_tables_are_one_line_before_training(tmp_path, content):
    table = tmp_path / "lat.json"
    if content is not None:
        table.write_bytes(content)
    sets = ["train.sampler=pss", "train.pss.metric=latency", f"train.pss.latency_table={table}"]
    out = tmp_path / "run"
    one_line_error(cli("train", write_config(tmp_path), "--out", out, *(a for s in sets for a in ("--set", s))), "lat.json")
    assert not out.exists()


def test_damaged_manifest_is_one_clear_error(tmp_path):
    from dynaslice.onnx_package import read_manifest

    (tmp_path / "manifest.json").write_bytes(b"\xff\x00")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        read_manifest(tmp_path)


def test_damaged_run_files_are_named_or_recovered(tmp_path, fast_run):
    run = copy_run(fast_run, tmp_path / "run")
    config = write_config(tmp_path)
    # a damaged `latest` pointer: the highest intact step is used, with a note; nothing restarts
    (run / runs.CHECKPOINTS / runs.LATEST).write_bytes(b"\x00\xff../../etc")
    final = json.loads((run / runs.FINAL_EVAL).read_text())
    rc, _, err = cli("train", config, "--out", run, "--resume")
    assert rc == 0 and "using the highest step found" in err
    # a damaged final_eval.json of a finished run: evaluated again from the final checkpoint
    (run / runs.FINAL_EVAL).write_bytes(b"\xff{")
    rc, _, err = cli("train", config, "--out", run, "--resume")
    assert rc == 0 and "evaluating the final checkpoint again" in err
    assert json.loads((run / runs.FINAL_EVAL).read_text()) == final
    (run / runs.FINAL_EVAL).write_text("[" * 100_000)  # too deep for json (RecursionError)
    rc, _, err = cli("train", config, "--out", run, "--resume")
    assert rc == 0 and "evaluating the final checkpoint again" in err
    # a damaged state.pt of the only checkpoint there is: one line, never a fresh start
    only = copy_run(fast_run, tmp_path / "only")
    for step in runs.checkpoint_steps(only)[:-1]:
        shutil.rmtree(step)
    (runs.checkpoint_steps(only)[-1] / runs.STATE_FILE).write_bytes(b"PK\x03\x04 not a zip")
    one_line_error(cli("train", config, "--out", only, "--resume"), "every checkpoint")
    assert not runs.checkpoint_steps(only)  # kept aside as damaged-step-N, for inspection
    assert len(list((only / runs.CHECKPOINTS).glob("damaged-step-*"))) == 1


def test_damaged_or_foreign_pipeline_settings_are_one_line(tmp_path):
    config = write_config(tmp_path, model={"gate": {"enabled": True, "routes": 3}})
    for content in (b"\xff\xfe", b"- a list\n", b"config: [1]\n"):
        out = tmp_path / f"run{len(content)}"
        out.mkdir()
        (out / runs.PIPELINE).write_bytes(content)
        one_line_error(cli("run", config, "--out", out), runs.PIPELINE if content != b"config: [1]\n" else "")


# --------------------------------------------------------------------------- checkpoints: damage detected


def flip(path: Path, rng: random.Random, count: int = 64) -> None:
    """Change ``count`` random bytes of ``path`` (each to another value)."""
    data = bytearray(path.read_bytes())
    for i in rng.sample(range(len(data)), min(count, len(data))):
        data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_detected_every_time(tmp_path, fast_run):
    newest = runs.checkpoint_steps(fast_run)[-1]
    original = load_checkpoint(newest)  # (trials damage copies: the mapped original stays as it is)
    rng = random.Random(17)
    trials = {"model": 0, "state": 0, "header": 0}
    for trial in range(39):
        ckpt = tmp_path / f"t{trial}"
        shutil.copytree(newest, ckpt)
        which = ("model", "state", "header")[trial % 3]
        if which == "header":  # the metadata, the checksum and its key live in the first kilobytes
            model = ckpt / runs.MODEL_FILE
            data = bytearray(model.read_bytes())
            for i in rng.sample(range(8, 8 + int.from_bytes(data[:8], "little")), 4):
                data[i] ^= rng.randrange(1, 256)
            model.write_bytes(bytes(data))
        else:
            flip(ckpt / (runs.MODEL_FILE if which == "model" else runs.STATE_FILE), rng)
        try:
            loaded = load_checkpoint(ckpt)
        except CheckpointError as e:
            assert "\n" not in str(e)
            trials[which] += 1
            continue
        # not refused: then nothing that matters changed (e.g. header whitespace to whitespace)
        assert loaded.meta == original.meta and loaded.tensors.keys() == original.tensors.keys()
        assert all(torch.equal(loaded.tensors[k], original.tensors[k]) for k in loaded.tensors)
    assert trials["model"] == trials["state"] == 13 and trials["header"] >= 10, trials  # 13 trials each


def test_resume_falls_back_past_a_damaged_checkpoint_to_the_same_model(tmp_path, fast_run):
    run = copy_run(fast_run, tmp_path / "run")
    final = runs.checkpoint_steps(run)[-1]
    want = {k: v.clone() for k, v in load_model_file(final / runs.MODEL_FILE)[0].items()}  # not the mapped file
    flip(final / runs.MODEL_FILE, random.Random(0))
    (run / runs.FINAL_EVAL).unlink()
    rc, out, err = cli("train", write_config(tmp_path), "--out", run, "--resume")
    assert rc == 0, err
    assert f"checkpoint {final} is damaged" in err and "resuming" in out and "at step 3/4" in out
    assert (final.parent / f"damaged-{final.name}").is_dir()
    got = load_model_file(final / runs.MODEL_FILE)[0]  # retrained from step 3: bit for bit the same
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_missing_latest_resumes_from_the_highest_intact_step(tmp_path, fast_run):
    run = copy_run(fast_run, tmp_path / "run")
    (run / runs.CHECKPOINTS / runs.LATEST).unlink()
    notes = []
    ckpt = load_resumable(run, log=notes.append)
    assert ckpt is not None and ckpt.state["step"] == 4 and "highest step" in notes[0]
    assert len(runs.checkpoint_steps(run)) == 3  # nothing pruned


# --------------------------------------------------------------------------- one writer; SIGKILL


def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_until_first_checkpoint(config: Path, run: Path) -> subprocess.Popen:
    """``dynaslice train`` in a second process, returned once its first checkpoint is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynaslice.cli", "train", str(config), "--out", str(run)],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    give_up = time.monotonic() + 240
    while not (run / runs.CHECKPOINTS / runs.LATEST).exists():
        if proc.poll() is not None or time.monotonic() > give_up:
            proc.kill()
            pytest.fail(f"train wrote no checkpoint: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return proc


def test_second_writer_is_refused_and_sigkill_resumes_exactly(tmp_path):
    config = write_config(tmp_path, train={"epochs": 3})  # 12 steps
    run, reference = tmp_path / "run", tmp_path / "reference"
    proc = train_until_first_checkpoint(config, run)
    try:
        proc.send_signal(signal.SIGSTOP)  # frozen mid-run, holding its lock, until the SIGKILL
        before = listing(run)
        # a second writer, of either kind, gets one line and changes nothing
        one_line_error(cli("train", config, "--out", run, "--resume"), f"is in use by pid {proc.pid}")
        run_config = write_config(tmp_path, "gated.yaml", model={"gate": {"enabled": True, "routes": 3}})
        one_line_error(cli("run", run_config, "--out", run), "is in use")
        assert proc.poll() is None and not runs.is_finished(run), "the first writer finished too early"
        assert {p for p in before if "step-" not in p} <= listing(run)
        assert not any("damaged" in p for p in listing(run))  # the second writer read nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the OS released the lock with the process: resume continues to the same model, bit for bit
    rc, out, err = cli("train", config, "--out", run, "--resume")
    assert rc == 0 and "resuming" in out, err
    assert cli("train", config, "--out", reference)[0] == 0
    got = load_model_file(runs.latest_pointer(run) / runs.MODEL_FILE)[0]
    want = load_model_file(runs.latest_pointer(reference) / runs.MODEL_FILE)[0]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_lock_belongs_to_the_process_and_nests(tmp_path):
    run = tmp_path / "run"
    with runs.exclusive(run):
        with runs.exclusive(tmp_path / "." / "run"):  # the same directory, spelled otherwise
            pass
        assert (run / runs.LOCK).read_text() == f"pid {os.getpid()}"
        held = subprocess.run(
            [sys.executable, "-c", f"from dynaslice import runs\nwith runs.exclusive({str(run)!r}): pass"],
            env=cli_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert held.returncode != 0 and "RunDirBusy" in held.stderr and f"pid {os.getpid()}" in held.stderr
    with runs.exclusive(run):  # released by the outer block's end
        pass


# --------------------------------------------------------------------------- divergence -> resume


def test_a_diverged_run_resumes_with_a_lower_learning_rate(tmp_path):
    config = write_config(tmp_path)
    run = tmp_path / "run"
    trainer = SupernetTrainer(load_config(config), run)
    trainer.save()  # the last good checkpoint, at step 0
    x, y = next(trainer.train_loader.epoch_batches(0))
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="--allow-change optim.lr=X"):
        trainer.train_step(x, y)
    del trainer

    one_line_error(cli("train", config, "--out", run, "--resume", "--set", "optim.lr=0.01"), "--allow-change")
    line = one_line_error(cli("train", config, "--out", run, "--resume", "--allow-change", "train.epochs=3"))
    assert "takes only optim.clip_grad_norm, optim.lr" in line
    one_line_error(cli("train", config, "--out", tmp_path / "new", "--allow-change", "optim.lr=0.01"), "--resume")
    rc, _, err = cli("train", config, "--out", run, "--resume", "--allow-change", "optim.lr=0.01",
                     "--allow-change", "optim.clip_grad_norm=1.0")  # fmt: skip
    assert rc == 0 and "optim.lr 0.05 -> 0.01" in err
    records = [json.loads(line) for line in (run / runs.METRICS).read_text().splitlines()]
    changes = next(r["config_changes"] for r in records if "config_changes" in r)
    assert changes == {"optim.lr": [0.05, 0.01], "optim.clip_grad_norm": [None, 1.0]}
    saved = yaml.safe_load((run / runs.CONFIG).read_text())["optim"]
    assert saved["lr"] == 0.01 and saved["clip_grad_norm"] == 1.0
    # the schedule is the one a run started with lr 0.01 follows
    fresh = tmp_path / "fresh"
    assert cli("train", config, "--out", fresh, "--set", "optim.lr=0.01", "--set", "optim.clip_grad_norm=1.0")[0] == 0
    lrs = lambda d: [r["lr"] for r in map(json.loads, (d / runs.METRICS).read_text().splitlines()) if "lr" in r]
    assert lrs(run) == pytest.approx(lrs(fresh), rel=1e-12)


def test_the_divergence_message_says_what_was_kept(tmp_path):
    trainer = SupernetTrainer(load_config(write_config(tmp_path)), tmp_path / "run")
    x, y = next(trainer.train_loader.epoch_batches(0))
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet") as e:
        trainer.train_step(x, y)
    assert "kept" not in str(e.value)


# --------------------------------------------------------------------------- dynaslice run directories


def test_run_directory_settings_are_protected_once_trained(tmp_path):
    config = write_config(tmp_path, model={"gate": {"enabled": True, "routes": 3}})
    out = tmp_path / "run"
    # a config error found when Stage I starts: nothing was trained, the fixed config goes ahead
    one_line_error(cli("run", config, "--out", out, "--set", "train.eval_widths=[0.01]"), "train.eval_widths")
    rc, _, err = cli("run", config, "--out", out, "--until", "stage1")
    assert rc == 0, err
    # trained: another config is refused, also when pipeline.yaml was deleted
    one_line_error(cli("run", config, "--out", out, "--set", "optim.lr=0.2"), "other settings")
    (out / runs.PIPELINE).unlink()
    one_line_error(cli("run", config, "--out", out, "--set", "optim.lr=0.2"), "no pipeline.yaml")


# --------------------------------------------------------------------------- round two: YAML, locks, signals (issue 34)


def alias_bomb(levels: int = 8, width: int = 10) -> str:
    """~800 bytes of flow YAML whose last item stands for ``width ** levels`` values."""
    items = [f"&a0 [{', '.join(['1'] * width)}]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


DEEP_YAML = "[" * 100_000 + "]" * 100_000  # a RecursionError deep in PyYAML
YAML_BOMBS = [
    # (where the value goes: a config file's key or an override, the value, what the line says)
    ("file", "model.kwargs.x", alias_bomb(), "alias"),  # was: no answer in 150 s
    ("file", "model.gate.routes", alias_bomb(), "alias"),  # was: no answer in 150 s
    ("file", "train.eval_widths", alias_bomb(), "alias"),  # was: refused after 30 s
    ("file", "model.kwargs.x", "&a [*a]", "alias"),  # a list that holds itself
    ("file", "model.kwargs.x", DEEP_YAML, "nests deeper than"),  # was: a RecursionError traceback
    ("set", "train.eval_widths", alias_bomb(), "alias"),
    ("set", "model.kwargs.x", DEEP_YAML, "nests deeper than"),
    ("run", "run.gate_targets", alias_bomb(), "alias"),  # dynaslice run's own overrides
]


@pytest.mark.parametrize("how, key, value, needle", YAML_BOMBS, ids=[f"{h}-{k}-{n}" for h, k, _, n in YAML_BOMBS])
def test_yaml_bombs_and_deep_nesting_are_refused_before_any_work(tmp_path, how, key, value, needle):
    out = tmp_path / "run"
    if how == "file":
        section, *parents, name = key.split(".")
        nested: dict = {name: "HERE"}
        for parent in reversed(parents):
            nested = {parent: nested}
        path = write_config(tmp_path, **{section: nested})
        path.write_text(path.read_text().replace("HERE", value))
        argv = ["train", path, "--out", out]
    else:
        command = "run" if how == "run" else "train"
        sections = {"model": {"gate": {"enabled": True, "routes": 3}}} if how == "run" else {}
        argv = [command, write_config(tmp_path, **sections), "--out", out, "--set", f"{key}={value}"]
    line = one_line_error(cli(*argv, seconds=20), needle)  # the deadline turns a hang into a failure
    assert len(line) < 500 and not out.exists()


DEEP_JSON = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError, not a ValueError


def test_deeply_nested_json_files_are_one_line(tmp_path, fast_run):
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP_JSON)
    (tmp_path / runs.BUDGET_TABLE).write_text(DEEP_JSON)
    inline = '{"stem": ' + "[" * 2000 + "]" * 2000 + "}"
    sets = ["train.sampler=pss", "train.pss.metric=latency", f"train.pss.latency_table={deep}"]
    cases = [
        ["select", tmp_path, "--max-macs", "1M"],  # a budget table
        ["train", write_config(tmp_path), "--out", tmp_path / "run", *(a for s in sets for a in ("--set", s))],
        ["eval", fast_run, "--archs", deep],  # archs, from a file or inline
        ["export", fast_run, "--arch", deep, "--out", tmp_path / "a.pt"],
        ["export", fast_run, "--arch", inline, "--out", tmp_path / "a.pt"],
    ]
    for argv in cases:
        one_line_error(cli(*argv), "nested deeper than")
    assert not (tmp_path / "run").exists() and not (tmp_path / "a.pt").exists()


def test_a_lock_file_replaced_before_it_was_locked_is_locked_again(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    lock, flock, replaced = run / runs.LOCK, fcntl.flock, []

    def replaced_then_locked(fd: int, operation: int) -> None:
        if not replaced and stat.S_ISREG(os.fstat(fd).st_mode):  # another process's failed start
            replaced.append(fd)  # deleted the file this one opened, and a third made a new one
            (run / "new").write_text("")
            os.replace(run / "new", lock)
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", replaced_then_locked)
    with runs.exclusive(run):
        assert replaced and lock.read_text() == f"pid {os.getpid()}"  # the lock held is the one at the path


def test_deleting_the_lock_of_a_running_train_lets_no_second_writer_in(tmp_path):
    config = write_config(tmp_path, train={"epochs": 3})  # 12 steps, a checkpoint every step
    run = tmp_path / "run"
    proc = train_until_first_checkpoint(config, run)
    try:
        proc.send_signal(signal.SIGSTOP)
        (run / runs.LOCK).unlink()  # "a stale lock", thinks the user
        one_line_error(cli("train", config, "--out", run, "--resume"), "is in use")
        assert proc.poll() is None and not runs.is_finished(run)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
        proc.wait()
    # the first writer notices at its next checkpoint and stops, in one line, before writing it
    assert proc.returncode == 2 and "deleted or replaced" in err.strip().splitlines()[-1], err[-2000:]
    rc, out, err = cli("train", config, "--out", run, "--resume")
    assert rc == 0 and "resuming" in out, err


def test_taking_the_lock_sweeps_what_killed_writers_left(tmp_path, fast_run):
    run = copy_run(fast_run, tmp_path / "run")
    ckpts = run / runs.CHECKPOINTS
    newest = runs.checkpoint_steps(run)[-1]
    want = (newest / runs.MODEL_FILE).read_bytes()
    os.replace(newest, ckpts / f".{newest.name}.old-0123abcd")  # SIGKILL between atomic_dir's renames
    (ckpts / f".{newest.name}.k3j4h5g6.tmp").mkdir()  # ... its new version, complete or not
    (ckpts / ".latest.abcdefgh.tmp").write_text("step-")  # SIGKILL while `latest` was written
    (run / ".config.yaml.zz_99zzz.tmp").write_text("")
    (ckpts / ".step-00000003.old-deadbeef").symlink_to(ckpts / "step-00000003")  # a link moved aside
    (run / "notes.tmp").write_text("the user's")  # not a name dynaslice makes: kept
    with runs.exclusive(run):
        pass
    assert (newest / runs.MODEL_FILE).read_bytes() == want  # put back, not lost
    assert sorted(p for p in listing(run) if ".tmp" in p or ".old-" in p) == ["notes.tmp"]
    assert (ckpts / "step-00000003").is_dir()


def test_sigterm_stops_a_train_like_ctrl_c_and_it_resumes(tmp_path):
    config = write_config(tmp_path, train={"epochs": 6})  # 24 steps: SIGTERM comes long before the end
    run = tmp_path / "run"
    proc = train_until_first_checkpoint(config, run)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "dynaslice train: terminated", err[-2000:]
    assert not runs.is_finished(run)
    assert not [p for p in listing(run) if p.endswith(".tmp") or ".old-" in p]
    rc, out, err = cli("train", config, "--out", run, "--resume")
    assert rc == 0 and "resuming" in out, err


def test_sigterm_while_a_checkpoint_is_written_leaves_no_temporaries(tmp_path, monkeypatch):
    from dynaslice.train import checkpoint

    sha256 = checkpoint.file_sha256

    def sigterm_then_sha256(path: Path) -> str:  # inside atomic_dir's block, the state half-saved
        os.kill(os.getpid(), signal.SIGTERM)
        return sha256(path)

    def unhandled(*_: object) -> None:
        raise AssertionError("SIGTERM reached the test: dynaslice's main installed no handler")

    monkeypatch.setattr(checkpoint, "file_sha256", sigterm_then_sha256)
    run = tmp_path / "run"
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        rc, _, err = cli("train", write_config(tmp_path), "--out", run)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # main put the previous handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert rc == 143 and err.strip().splitlines()[-1] == "dynaslice train: terminated", err
    assert not [p for p in listing(run) if ".tmp" in p or ".old-" in p], listing(run)


def test_a_writable_run_folder_in_a_read_only_parent_is_accepted(tmp_path, monkeypatch):
    # root passes every permission check: the read-only parent is os.access's answer here
    from dynaslice.cli.common import UserError, run_dir_arg

    run = tmp_path / "run"
    run.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path and access(path, mode))
    assert run_dir_arg(run) == run  # a run writes inside its folder, never next to it
    with pytest.raises(UserError, match="not writable"):
        run_dir_arg(tmp_path / "new")  # a new run would be made in the read-only parent


# --------------------------------------------------------------------------- fuzz


HOSTILE = ["-1", "0", "-0.5", "1e-9", "1e400", ".nan", "-.inf", "1000000000000", "abc", "''", "[1, 2]",
           "[.nan]", "{a: 1}", "true", "null", "[]", "0.999", "7",
           alias_bomb(), "&a [*a]", "[" * 64 + "]" * 64]  # fmt: skip
# values of the key's own type, so that range checks are reached and not only type checks
HOSTILE_OF = {
    int: ["-1", "0", "1", "7", "1000000000000", "-1000000000000"],
    float: ["-0.5", "0", "1e-9", "0.999", "1.5", "7", "1e300", "1e400", ".nan", "-.inf"],
    bool: ["true", "false"],
    list: ["[]", "[0.5]", "[.nan]", "[-1, 2]", "[0.01]", "[1, 2, 3]"],
    str: ["abc", "''", "macs"],
}
SLOW_WHEN_HUGE = {"train.epochs"}  # a long run is what a huge epoch count asks for, not a hang


def _draw_cases(n: int, seed: int = 17) -> list[tuple[str, str]]:
    """``n`` seeded ``(key, value)`` pairs: half the values of the key's own type, half anything."""
    rng = random.Random(seed)
    defaults = flatten(Config().to_dict())
    cases: list[tuple[str, str]] = []
    while len(cases) < n:
        key = rng.choice(sorted(defaults))
        own = HOSTILE_OF.get(type(defaults[key]), HOSTILE)
        value = rng.choice(own if rng.random() < 0.5 else HOSTILE)
        if key in SLOW_WHEN_HUGE and value.lstrip("-").startswith("1000000000000"):
            continue
        cases.append((key, value))
    return cases


FUZZ_CASES = int(os.environ.get("DYNASLICE_FUZZ_CASES", "60"))  # more: DYNASLICE_FUZZ_CASES=400
FUZZ_SEED = int(os.environ.get("DYNASLICE_FUZZ_SEED", "17"))


def test_config_fuzz(tmp_path):
    """Seeded hostile values for keys drawn from the config dataclasses: exit code 0 or 2, never
    a traceback or a hang, and an accepted value is exactly the one recorded and trained with."""
    # no validation split: the final BN recalibration runs, the evaluation (and its MAC model) not
    config = write_config(tmp_path, data={"val_size": 0}, train={"eval_widths": [1.0]})
    base = flatten(load_config(config).to_dict())
    outcomes = {0: 0, 2: 0}
    for i, (key, value) in enumerate(_draw_cases(FUZZ_CASES, FUZZ_SEED)):
        out = tmp_path / f"run{i}"
        rc, _, err = cli("train", config, "--out", out, "--set", f"{key}={value}", seconds=90)
        assert rc in (0, 2), (key, value, err)
        outcomes[rc] += 1
        if rc == 2:
            line = one_line_error((rc, "", err))
            if out.exists():  # only a run that started may leave files: it diverged, and says so
                assert "training stopped" in line, (key, value, line)
            continue
        # accepted: the run finished, and recorded exactly the value asked for (nothing clamped)
        assert runs.is_finished(out), (key, value)
        if key == "train.static_widths" and yaml.safe_load(value):  # one run per width, each its own config
            widths = yaml.safe_load(value)
            assert all(runs.is_finished(out / runs.static_name(w)) for w in widths), (key, value)
            continue
        saved = flatten(yaml.safe_load((out / runs.CONFIG).read_text()))
        expected = yaml.safe_load(value)
        if isinstance(saved[key], float) and isinstance(expected, int | str):
            expected = float(expected)  # an int where a float goes; YAML 1.1 reads 1e-9 as a string
        assert saved[key] == expected, (key, value, saved[key])
        assert {k: v for k, v in saved.items() if k != key} == {k: v for k, v in base.items() if k != key}
    assert outcomes[2] > outcomes[0] > 0, outcomes  # the generator reaches both outcomes


# --------------------------------------------------------------------------- this round's new commands and keys

NEW_COMMAND_MISTAKES = [
    # (command and arguments after the config, what the one line must say)
    (["binarize", "nope"], "unknown binary method 'nope'"),
    (["binarize", "siman", "--set", "binary.width_mult=0"], "binary.width_mult"),
    (["binarize", "siman", "--set", "binary.width_mult=abc"], "binary.width_mult"),
    (["binarize", "siman", "--set", "binary.nope=1"], "binary.nope"),
    (["prune", "jackpot", "--set", "prune.sparsity=1.5"], "prune.sparsity"),
    (["prune", "jackpot", "--set", "prune.sparsity=0"], "prune.sparsity"),
    (["prune", "jackpot", "--set", "prune.score_init=nope"], "prune.score_init"),
    (["prune", "jackpot", "--set", "prune.tune_epochs=-1"], "prune.tune_epochs"),
    (["train", "--set", "train.target=ffsd", "--set", "train.ffsd.students=0"], "train.ffsd.students"),
    (["train", "--set", "train.target=ffsd", "--set", "train.ffsd.students=x"], "train.ffsd.students"),
    (["train", "--set", "model.gate.enabled=true", "--set", "model.gate.cut=[1]"], "model.gate.cut"),
    (["train", "--set", "model.gate.enabled=true", "--set", "model.gate.cut=layer9.nope"], "module paths name the cuts"),
    (["train", "--set", "data.seq_len=0"], "data.seq_len=0"),
    (["train", "--set", "model.name=hf:llama", "--set", "data.name=text", "--set", "data.root=/nonexistent"],
     "text corpus /nonexistent not found"),
    (["train", "--set", "model.name=hf:llama"], "language models (hf:...) train on data.name: text"),
]


@pytest.mark.parametrize("args,needle", NEW_COMMAND_MISTAKES, ids=[" ".join(a) for a, _ in NEW_COMMAND_MISTAKES])
def test_new_commands_refuse_bad_values_in_one_line_before_any_work(tmp_path, args, needle):
    """binarize (issue 30), prune jackpot and train.target=ffsd (issue 31), model.gate.cut as a
    module path (issue 28), language-model training (issue 32): a bad method or value is one line,
    and nothing is written."""
    out = tmp_path / "run"
    command, rest = args[0], args[1:]
    if command == "train":
        argv = [command, write_config(tmp_path), *rest, "--out", out]
    else:
        argv = [command, *rest[:1], "--config", write_config(tmp_path), *rest[1:], "--out", out]
    one_line_error(cli(*argv), needle)
    assert not out.exists()


def test_export_binary_refuses_what_is_not_a_binary_run_in_one_line(tmp_path):
    """``dynaslice export RUN --binary`` (issue 30): a missing path, a folder without a binary
    network, and a damaged model.pt are one line each, and no package is written."""
    out = tmp_path / "pkg"
    one_line_error(cli("export", tmp_path / "nope", "--binary", "--out", out), "not found")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("export", tmp_path / "empty", "--binary", "--out", out), "holds no model.pt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.pt").write_bytes(b"not a torch file")
    one_line_error(cli("export", tmp_path / "bad", "--binary", "--out", out), "model.pt")
    assert not out.exists()
