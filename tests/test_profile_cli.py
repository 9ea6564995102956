"""``dynaslice profile``: runs on a tiny model, writes the right JSON, and fails in one line."""

import json

import pytest

import dynaslice as ds
from dynaslice.cli import main


def test_profile_table_and_json(tmp_path, capsys):
    out = tmp_path / "sub" / "profile.json"
    rc = main(
        ["profile", "vit_small_input", "--input-size", "1", "28", "28", "--repeats", "2", "--json", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "static ms" in printed and "uniform 0.5" in printed and "largest" in printed

    data = json.loads(out.read_text())
    assert data["model"] == "vit_small_input"
    assert data["input_size"] == [1, 28, 28] and data["batch_size"] == 1 and data["repeats"] == 2
    net = ds.create_supernet("vit_small_input", in_chans=1, input_size=28)
    names = [r["name"] for r in data["subnets"]]
    assert names == ["smallest", "uniform 0.35", "uniform 0.5", "uniform 0.75", "largest"]
    expected = [net.space.smallest(), *(net.space.uniform(r) for r in (0.35, 0.5, 0.75)), net.space.largest()]
    for row, arch in zip(data["subnets"], expected, strict=True):
        assert ds.Arch(row["arch"]) == arch
        assert row["macs"] == ds.count_macs(net, arch)
        assert row["params"] == ds.count_params(net, arch)
        assert len(row["static_ms_all"]) == len(row["sliced_ms_all"]) == 2
        assert row["static_ms"] > 0 and row["sliced_ms"] > 0
        largest = data["subnets"][-1]["static_ms_all"]
        paired = sorted(a / b for a, b in zip(largest, row["static_ms_all"], strict=True))
        assert row["speedup"] == pytest.approx((paired[0] + paired[1]) / 2)  # median of 2 paired ratios
    assert data["subnets"][-1]["speedup"] == 1.0
    assert data["subnets"][0]["macs"] < data["subnets"][-1]["macs"]
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def test_profile_without_latency_and_with_num_classes(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "resnet_small", "--num-classes", "7", "--no-latency", "--json", str(out)]) == 0
    assert "static ms" not in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["num_classes"] == 7 and data["input_size"] == [3, 32, 32]
    assert all("static_ms" not in r for r in data["subnets"])
    net = ds.create_supernet("resnet_small", num_classes=7)
    assert data["subnets"][-1]["params"] == ds.count_params(net, net.space.largest())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "vit_smal"], "Unknown supernet 'vit_smal'. Did you mean 'vit_small'? Available: "),
        (["profile", "resnet_small", "--repeats", "0"], "--repeats: '0' must be at least 1"),
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
