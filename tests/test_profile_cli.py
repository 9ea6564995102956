"""``dynaslice profile``: runs on a tiny model, writes the right JSON, and fails in one line."""

import json

import pytest

import dynaslice as ds
from dynaslice.cli import main


def test_profile_table_and_json(tmp_path, capsys):
    out = tmp_path / "sub" / "profile.json"
    argv = ["profile", "vit_small_input", "--input-size", "1", "28", "28", "--repeats", "2",
            "--batch-sizes", "1", "3", "--runtimes", "eager,frozen", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "frozen ms" in printed and "uniform 0.5" in printed and "fastest here at batch 3" in printed

    data = json.loads(out.read_text())
    assert data["model"] == "vit_small_input"
    assert data["input_size"] == [1, 28, 28] and data["batch_sizes"] == [1, 3] and data["repeats"] == 2
    net = ds.create_supernet("vit_small_input", in_chans=1, input_size=28)
    names = [r["name"] for r in data["subnets"]]
    assert names == ["smallest", "uniform 0.35", "uniform 0.5", "uniform 0.75", "largest"]
    expected = [net.space.smallest(), *(net.space.uniform(r) for r in (0.35, 0.5, 0.75)), net.space.largest()]
    for row, arch in zip(data["subnets"], expected, strict=True):
        assert ds.Arch(row["arch"]) == arch
        assert row["macs"] == ds.count_macs(net, arch)
        assert row["params"] == ds.count_params(net, arch)
    lat = data["latency"]
    assert {(r["runtime"], r["batch"]) for r in lat} == {(rt, b) for rt in ("eager", "frozen") for b in (1, 3)}
    for r in lat:
        assert len(r["ms_all"]) == 2 and r["ms"] > 0
        largest = next(x for x in lat if (x["runtime"], x["batch"], x["name"]) == (r["runtime"], r["batch"], "largest"))
        paired = sorted(a / b for a, b in zip(largest["ms_all"], r["ms_all"], strict=True))
        assert r["speedup"] == pytest.approx((paired[0] + paired[1]) / 2)  # median of 2 paired ratios
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["macs"] / largest["macs"])
    assert data["fastest"]["1"] in ("eager", "frozen")
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def test_profile_without_latency_and_with_num_classes(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "resnet_small", "--num-classes", "7", "--no-latency", "--json", str(out)]) == 0
    assert "interleaved rounds" not in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["num_classes"] == 7 and data["input_size"] == [3, 32, 32] and data["latency"] == []
    net = ds.create_supernet("resnet_small", num_classes=7)
    assert data["subnets"][-1]["params"] == ds.count_params(net, net.space.largest())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "vit_smal"], "Unknown supernet 'vit_smal'. Did you mean 'vit_small'? Available: "),
        (["profile", "resnet_small", "--repeats", "0"], "--repeats: '0' must be at least 1"),
        (["profile", "resnet_small", "--num-classes", "0"], "--num-classes: '0' must be at least 1"),  # no torch warning
        (["profile", "resnet_small", "--runtimes", "fast"], "unknown runtime 'fast'"),
        (
            ["profile", "vit_small_input", "--input-size", "3", "30", "30", "--no-latency"],
            "not a multiple of patch_size",
        ),
    ],
)
def test_profile_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    if "Unknown" in message:
        assert "vit_tiny" in err and "resnet50" in err


def test_one_network_is_one_row_and_batch_times_are_labelled(tmp_path, capsys, monkeypatch):
    """resnet's smallest subnet *is* its uniform 0.35 one: timed as two rows it once showed two
    speed-ups (1.60x, 2.00x). Times of a batch are per batch, and the table says so. With the
    progress interval at 0, the preparation and the timing print lines in a log file too."""
    monkeypatch.setenv("DYNASLICE_PROGRESS_SECONDS", "0")
    out = tmp_path / "p.json"
    argv = ["profile", "resnet_small", "--input-size", "1", "8", "8", "--repeats", "1", "--batch-sizes", "1", "3",
            "--runtimes", "eager", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    net = ds.create_supernet("resnet_small", in_chans=1, input_size=8)
    assert net.space.smallest() == net.space.uniform(0.35)
    names = ["smallest = uniform 0.35", "uniform 0.5", "uniform 0.75", "largest"]
    assert [r["name"] for r in data["subnets"]] == names
    assert [r["name"] for r in data["latency"] if r["batch"] == 3] == names
    assert "batch 3 (times per batch of 3 images):" in captured.out and "eager ms/batch" in captured.out
    assert "| smallest = uniform 0.35 |" in captured.out and "per batch" in data["latency_unit"]
    assert "preparing: 1/4 models" in captured.err and "timing batch 3: 1/16 calls" in captured.err
