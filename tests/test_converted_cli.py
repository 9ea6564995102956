"""Converted networks (make_supernet) named in a config: ``model.name: torchvision:resnet18``,
``timm:NAME`` or ``package.module:factory``, through model files, ``train.init_from`` and the CLI."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file
from test_reliability import FAST, cli, one_line_error

from dynaslice import create_supernet, load_supernet, runs
from dynaslice.modelfile import CheckpointError, save_model_file
from dynaslice.models import ConvertedSupernet
from dynaslice.train.init import init_from

TV = "torchvision:resnet18"
SIDE = 32  # ResNet-18 divides by 32: 1x1 before its pooling
DATA = {"image_size": SIDE, "synthetic_channels": 3, "synthetic_train": 32, "val_size": 8}
RATIOS = [0.5, 1.0]


def write(folder: Path, name: str = "cfg.yaml", model: dict | None = None, **sections: dict) -> Path:
    data = {k: dict(v) for k, v in FAST.items()}
    data["data"].update(DATA)
    data["model"] = model or {"name": TV, "kwargs": {"ratios": RATIOS}}
    for key, values in sections.items():
        data[key] = {**data.get(key, {}), **values}
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- the registry


def test_torchvision_name_builds_a_converted_supernet():
    net = create_supernet(TV, num_classes=10, input_size=SIDE, ratios=RATIOS, round_to=16)
    assert isinstance(net, ConvertedSupernet)
    assert (net.num_classes, net.input_size) == (10, (3, SIDE, SIDE))
    assert net.space["layer1.0.conv1"].choices == (32, 64)  # ratios 0.5 and 1 of 64, multiples of 16
    x = torch.randn(2, 3, SIDE, SIDE)
    assert net(x, net.space.smallest()).shape == (2, 10)


@pytest.fixture
def factory_module(tmp_path, monkeypatch) -> str:
    """A module of the user's, importable as ``userzoo``."""
    (tmp_path / "userzoo.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def tiny(num_classes=10, width=16):
            return nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
            )

        def fixed():  # takes neither num_classes nor in_chans: 7 classes
            return tiny(num_classes=7)

        def broken(**kwargs):
            raise RuntimeError("no GPU found")

        def not_a_model(**kwargs):
            return 42

        NOT_CALLABLE = 3
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "userzoo", raising=False)
    return "userzoo"


def test_factory_name_gets_model_kwargs_and_the_data_s_classes(factory_module):
    net = create_supernet("userzoo:tiny", num_classes=5, in_chans=3, input_size=8, width=32, ratios=RATIOS)
    assert net.num_classes == 5 and net.input_size == (3, 8, 8)
    assert max(net.space["0"].choices) == 32  # width=32 reached the factory


def test_factory_without_num_classes_is_checked_against_the_data(factory_module):
    assert create_supernet("userzoo:fixed", input_size=8).num_classes == 7  # nothing asked: its own
    with pytest.raises(ValueError, match="predicts 7 classes, the data has 10"):
        create_supernet("userzoo:fixed", num_classes=10, input_size=8)


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("torchvision:nosuch", {}, "torchvision has no model 'nosuch'"),
        ("torchvision:resnet1", {}, "Did you mean 'torchvision:resnet18'"),
        ("nosuchpkg.mod:fn", {}, "cannot import 'nosuchpkg.mod'"),
        ("userzoo:missing", {}, "userzoo has no callable 'missing'"),
        ("userzoo:NOT_CALLABLE", {}, "has no callable 'NOT_CALLABLE'"),
        ("userzoo:broken", {}, "failed: RuntimeError: no GPU found"),
        ("userzoo:not_a_model", {}, "returned a int, not a torch.nn.Module"),
        ("userzoo:tiny", {"depth": 3}, "userzoo:tiny(depth=3) failed: TypeError"),
        (":tiny", {}, "write torchvision:<model>, timm:<model> or package.module:factory"),
    ],
)
def test_bad_names_are_one_line(factory_module, tmp_path, name, kwargs, needle):
    model = {"name": name, "kwargs": {**kwargs, "ratios": RATIOS}}
    line = one_line_error(cli("train", write(tmp_path, model=model), "--out", tmp_path / "run"), needle)
    assert line.startswith("dynaslice train: error:")


def test_timm_without_timm_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    model = {"name": "timm:resnet18", "kwargs": {"ratios": RATIOS}}
    one_line_error(
        cli("train", write(tmp_path, model=model), "--out", tmp_path / "run"),
        "pip install 'dynaslice[models]'",
    )


def test_torchvision_on_grey_images_is_one_line(tmp_path):
    cfg = write(tmp_path, data={"synthetic_channels": 1})
    one_line_error(cli("train", cfg, "--out", tmp_path / "run"), "takes 3-channel images, these have 1")


def test_unknown_timm_model_is_one_line():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="timm has no model 'nosuch_net'"):
        create_supernet("timm:nosuch_net")
    with pytest.raises(ValueError, match="timm has no model"):  # no hub download from a name
        create_supernet("timm:hf-hub:someone/model")


def test_timm_name_takes_the_data_s_channels():
    pytest.importorskip("timm")
    net = create_supernet("timm:resnet18", in_chans=1, num_classes=10, input_size=SIDE, ratios=RATIOS)
    assert (net.num_classes, net.input_size) == (10, (1, SIDE, SIDE))
    assert net(torch.randn(2, 1, SIDE, SIDE), net.space.smallest()).shape == (2, 10)


# --------------------------------------------------------------------------- train, then every command


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """``dynaslice train`` of torchvision's ResNet-18 started from its own plain state dict, by
    PSS-Net (a budget table for ``select``)."""
    folder = tmp_path_factory.mktemp("converted")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    start = folder / "resnet18.pt"
    torch.save(model.state_dict(), start)
    pss = {"bucket_step": 5, "pool_size": 4, "estimate_samples": 200, "select_top_k": 1}
    cfg = write(folder, train={"init_from": str(start), "eval_widths": [0.5, 1.0], "sampler": "pss",
                               "num_subnets": 3, "pss": pss})  # fmt: skip
    rc, out, err = cli("train", cfg, "--out", folder / "run", seconds=300)
    assert rc == 0, err
    assert f"loaded the starting weights: {start} (state_dict)" in out
    return folder, folder / "run", model


def test_train_records_the_converted_model_and_the_file_rebuilds_it(trained):
    _, run, _ = trained
    net, meta = load_supernet(run / runs.RECALIBRATED)
    assert isinstance(net, ConvertedSupernet) and meta["model"]["name"] == TV
    assert meta["model"]["kwargs"] == {"in_chans": 3, "num_classes": 10, "input_size": SIDE, "ratios": RATIOS}
    assert net.input_size == (3, SIDE, SIDE)


def test_eval_export_quantize_select_profile_on_the_converted_run(trained):
    folder, run, _ = trained
    rc, out, err = cli("eval", run, "--archs", "largest", "x0.5")
    assert rc == 0, err
    assert "| largest |" in out and "| x0.5 |" in out
    small = folder / "small.pt"
    rc, _, err = cli("export", run / runs.RECALIBRATED, "--arch", "x0.5", "--format", "torch", "--out", small)
    assert rc == 0, err
    net, _ = load_supernet(run / runs.RECALIBRATED)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.allclose(
            torch.load(small, weights_only=False)(x), net.eval()(x, net.space.uniform(0.5)), atol=1e-5
        )
    onnx_file = folder / "small.onnx"
    rc, _, err = cli("export", run / runs.RECALIBRATED, "--arch", "x0.5", "--out", onnx_file)
    assert rc == 0, err
    rc, out, err = cli("quantize", onnx_file, "--out", folder / "small_int8.onnx", "--calibration", "real",
                       "--images", "8", "--run", run, seconds=300)  # fmt: skip
    assert rc == 0, err
    assert (folder / "small_int8.onnx").is_file()
    rc, out, err = cli("select", run, "--max-macs", "30M", "--export", folder / "selected.onnx")
    assert rc == 0, err
    assert (folder / "selected.onnx").is_file()
    rc, out, err = cli("profile", TV, "--input-size", 3, SIDE, SIDE, "--num-classes", 10, "--no-latency")
    assert rc == 0, err
    assert "largest" in out and "MMACs" in out


def test_init_from_plain_state_dict_makes_the_largest_subnet_the_model(tmp_path):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10).eval()
    net = create_supernet(TV, num_classes=10, input_size=SIDE, ratios=RATIOS).eval()
    x = torch.randn(2, 3, SIDE, SIDE)
    for file in (tmp_path / "r18.safetensors", tmp_path / "r18.pth"):
        if file.suffix == ".pth":
            torch.save(model.state_dict(), file)
        else:
            save_file(model.state_dict(), file)
        fresh = create_supernet(TV, num_classes=10, input_size=SIDE, ratios=RATIOS).eval()
        assert init_from(fresh, file)["kind"] == "state_dict"
        with torch.no_grad():
            assert torch.allclose(fresh(x, fresh.space.largest()), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit the largest subnet"):
        other = tmp_path / "r34.pt"
        torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), other)
        init_from(net, other)


def test_init_from_a_pickle_that_is_no_state_dict_is_refused(tmp_path):
    net = create_supernet(TV, num_classes=10, input_size=SIDE, ratios=RATIOS)
    bad = tmp_path / "model.pt"
    torch.save(torchvision.models.resnet18(num_classes=10), bad)  # a whole module: pickled code
    with pytest.raises(ValueError, match="cannot read .* as a torch state dict"):
        init_from(net, bad)


# --------------------------------------------------------------------------- model files never import


def test_model_file_naming_arbitrary_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    file = tmp_path / "evil.safetensors"
    meta = {"model": {"name": "os:system", "kwargs": {"command": f"touch {marker}"}}, "config": FAST}
    save_model_file(file, {"model.w": torch.zeros(1)}, meta)
    with pytest.raises(CheckpointError, match="dynaslice imports none"):
        load_supernet(file)
    line = one_line_error(cli("eval", file), "'os:system'", "trust=")
    assert "dynaslice eval: error:" in line
    assert not marker.exists()


def test_model_file_of_a_user_factory_loads_when_trusted(factory_module, tmp_path):
    kwargs = {"num_classes": 4, "in_chans": 3, "input_size": 8, "ratios": RATIOS}
    net = create_supernet("userzoo:tiny", **kwargs)
    file = tmp_path / "tiny.safetensors"
    save_model_file(file, {f"model.{k}": v for k, v in net.state_dict().items()},
                    {"model": {"name": "userzoo:tiny", "kwargs": kwargs}})  # fmt: skip
    with pytest.raises(CheckpointError, match="trust"):
        load_supernet(file)
    back, _ = load_supernet(file, trust=["userzoo:tiny"])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(back.eval()(x, back.space.smallest()), net.eval()(x, net.space.smallest()))


def test_commands_load_a_user_factory_s_run_only_with_trust_factory(factory_module, tmp_path):
    """The run's model file names ``userzoo:tiny``: eval refuses it in one line unless the user
    names that factory with ``--trust-factory``."""
    config = write(tmp_path, model={"name": "userzoo:tiny", "kwargs": {"ratios": RATIOS}})
    run = tmp_path / "run"
    assert cli("train", config, "--out", run)[0] == 0
    one_line_error(cli("eval", run, "--archs", "smallest"), "'userzoo:tiny'")
    rc, out, err = cli("eval", run, "--archs", "smallest", "--trust-factory", "userzoo:tiny")
    assert rc == 0 and "smallest" in out, err
    export = ("export", run, "--arch", "smallest", "--out", tmp_path / "small.pt")
    one_line_error(cli(*export), "'userzoo:tiny'")
    assert cli(*export, "--trust-factory", "userzoo:tiny")[0] == 0 and (tmp_path / "small.pt").is_file()


def test_model_file_reads_no_other_weights_it_names(tmp_path):
    pytest.importorskip("timm")
    elsewhere = tmp_path / "not-read.pth"  # absent: timm would fail reading it
    kwargs = {"num_classes": 4, "in_chans": 1, "input_size": SIDE, "ratios": RATIOS}
    net = create_supernet("timm:resnet18", **kwargs)
    file = tmp_path / "timm.safetensors"
    recorded = {**kwargs, "checkpoint_path": str(elsewhere), "pretrained": True}
    save_model_file(file, {f"model.{k}": v for k, v in net.state_dict().items()},
                    {"model": {"name": "timm:resnet18", "kwargs": recorded}})  # fmt: skip
    back, _ = load_supernet(file)
    assert all(
        torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values(), strict=True)
    )


# --------------------------------------------------------------------------- gates


def test_gate_on_a_converted_net_at_a_stage_number_is_one_line(tmp_path):
    """A converted net's gate sits at a module path (tests/test_converted_gate.py); a stage
    number names none of its places: one line listing them."""
    gate = {"enabled": True, "routes": 2, "cut": 0}
    cfg = write(tmp_path, model={"name": TV, "kwargs": {"ratios": RATIOS}, "gate": gate})
    line = one_line_error(cli("run", cfg, "--out", tmp_path / "run"), "model.gate: gate cut 0", "converted")
    assert "the cuts there are: conv1, bn1, relu, maxpool, layer1.0, layer1," in line
