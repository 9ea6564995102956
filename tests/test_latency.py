"""Latency lookup tables: block structure, interpolation, predict = sum of blocks, the CLI.

No timing assertions: times on a shared machine are noise; only the bookkeeping is checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dynaslice.cli import main
from dynaslice.latency import LatencyBlock, LatencyTable, block_dims, build_latency_table, subsample
from dynaslice.models import create_supernet
from dynaslice.space import Arch

torch.set_num_threads(1)


def tiny():
    return create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=8, ratios=[0.5, 0.75, 1.0])


def test_block_dims_include_the_dims_that_set_the_input_width():
    net = tiny()
    dims = dict(block_dims(net, net.input_size))
    assert dims == {
        "stem": ("s1",),
        "stage0": ("s1",),
        "stage1": ("s1", "s2"),  # stage 1 reads s2 and gets s1 channels in
        "stage2": ("s2", "s3"),
        "stage3": ("s3", "s4"),
        "head": ("s4",),
    }


def test_subsample_keeps_the_ends():
    assert subsample((1, 2, 3), 5) == (1, 2, 3)
    assert subsample(tuple(range(10)), 3) == (0, 4, 9) or subsample(tuple(range(10)), 3) == (0, 5, 9)
    assert subsample(tuple(range(10)), 2) == (0, 9)


def test_block_interpolates_multilinearly():
    b = LatencyBlock("x", ("a", "b"), ((8, 16), (2, 4, 8)), np.array([[1.0, 2.0, 4.0], [3.0, 4.0, 6.0]]))
    assert b.predict({"a": 8, "b": 4}) == 2.0  # a grid point: the measured value
    assert b.predict({"a": 12, "b": 2}) == pytest.approx(2.0)
    assert b.predict({"a": 12, "b": 6}) == pytest.approx((3.0 + 5.0) / 2)
    assert b.predict({"a": 16, "b": 8}) == 6.0


def test_built_table_predicts_the_sum_of_its_blocks(tmp_path):
    net = tiny()
    table = build_latency_table(net, repeats=1, warmup=0, max_values=2, calibration=2, progress=False)
    assert [b.name for b in table.blocks] == ["stem", "stage0", "stage1", "stage2", "stage3", "head"]
    assert all(b.ms.shape == tuple(len(g) for g in b.grid) and (b.ms > 0).all() for b in table.blocks)
    rng = np.random.default_rng(0)
    for _ in range(5):
        arch = net.space.sample(int(rng.integers(1 << 30)))
        assert table.predict(arch) == pytest.approx(
            table.overhead_ms + sum(b.predict(arch) for b in table.blocks)
        )
    largest = net.space.largest()
    assert table.predict(largest) == pytest.approx(
        table.overhead_ms + sum(float(b.ms.flat[-1]) for b in table.blocks)
    )
    table.save(tmp_path / "lat.json")
    again = LatencyTable.load(tmp_path / "lat.json")
    archs = [net.space.sample(i) for i in range(4)]
    assert np.allclose(again.predict_many(archs), table.predict_many(archs))
    with pytest.raises(ValueError, match="not a dynaslice latency table"):
        (tmp_path / "bad.json").write_text("{}")
        LatencyTable.load(tmp_path / "bad.json")


def test_profile_cli_builds_a_latency_table(tmp_path, capsys):
    out = tmp_path / "lat.json"
    args = ["profile", "resnet_small", "--input-size", "1", "8", "8", "--num-classes", "10"]
    args += ["--latency-table", str(out), "--repeats", "1", "--grid-values", "2", "--check", "2"]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "resnet_small" and len(data["blocks"]) == 6
    assert "median_abs_pct_error" in data["check"]
    assert "held-out check" in capsys.readouterr().out
    assert main(args[:-4] + ["--grid-values", "1", "--check", "2"]) == 2
    table = LatencyTable.load(out)  # (its values are timings: only their relation is checked)
    arch = Arch(s1=16, s2=32, s3=64, s4=128)
    assert table.predict(arch) == pytest.approx(table.overhead_ms + sum(b.predict(arch) for b in table.blocks))


def test_measure_latency_waits_for_cuda_work(monkeypatch):
    """CUDA kernels run asynchronously: each timed call must sit between two synchronisations,
    or the time measured is only the launch. Simulated here (CI has no GPU)."""
    from dynaslice.latency import measure_latency

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    times = measure_latency({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, repeats=2, warmup=1)
    assert [len(t) for t in times.values()] == [2, 2]
    timed = events[2:]  # after one warm-up call each
    assert timed == ["sync", "a", "sync", "sync", "b", "sync"] * 2
    events.clear()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    measure_latency({"a": lambda: events.append("a")}, repeats=2, warmup=0)
    assert events == ["a", "a"]  # no CUDA in use: nothing to wait for


def test_latency_measurements_report_progress_in_a_log_file(capsys, monkeypatch):
    """Timing takes minutes on a real model: with a description, every call counts towards a
    progress line (here every update, interval 0); without one (benchmarks) nothing is printed."""
    from dynaslice.latency import measure_latency

    monkeypatch.setenv("DYNASLICE_PROGRESS_SECONDS", "0")
    measure_latency({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=1, desc="latency")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("latency: 1/6 calls (17%), ") and err[-1].startswith("latency: 5/6 calls")
    measure_latency({"a": lambda: None}, repeats=2, warmup=1)
    assert capsys.readouterr().err == ""
    net = tiny()
    build_latency_table(net, repeats=1, warmup=0, max_values=2, calibration=2)
    err = capsys.readouterr().err
    assert "latency table: 2/18 points" in err  # updated per chunk of timed grid points
