"""``dynaslice quantize``: int8 artifacts from real, FDDA and noise calibration, accuracy beside the
float original, and one-line errors (exit 2) for what the user has to fix."""

import json
from pathlib import Path

import pytest
import torch

import dynaslice as ds
from dynaslice.cli import main
from dynaslice.modelfile import model_spec, prefixed, save_model_file
from dynaslice.onnx_export import export_onnx
from dynaslice.onnx_package import OnnxModel
from dynaslice.train.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter

SETS = [
    "data.name=synthetic", "data.image_size=8", "data.val_size=16", "data.synthetic_train=64",
    "data.synthetic_test=48", "train.threads=1", "train.device=cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A model file whose config names the (synthetic, 8x8) dataset, and its largest subnet as ONNX."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    kwargs = {"in_chans": 1, "num_classes": 10, "input_size": 8}
    net = ds.create_supernet("resnet_small", **kwargs).eval()
    cfg = load_config(None, SETS)
    model = root / "model.safetensors"
    save_model_file(model, prefixed("model", net), {"model": model_spec(net, kwargs, "resnet_small"), "config": cfg.to_dict()})
    return model, export_onnx(net, net.space.largest(), root / "float.onnx")


def quantize(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["quantize", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_real_calibration_writes_an_int8_model_and_reports_both_accuracies(run, tmp_path, capsys):
    model, onnx = run
    code, out, err = quantize(capsys, str(onnx), "--out", str(tmp_path / "q.onnx"), "--calibration", "real",
                              "--images", "20", "--run", str(model))  # fmt: skip
    assert code == 0, err
    assert "calibrated on 20 real images" in out
    assert "float top-1" in out and "int8" in out and "on 48 test images" in out
    q = OnnxModel(tmp_path / "q.onnx")
    meta = json.loads(q.session.get_modelmeta().custom_metadata_map["dynaslice.quantization"])
    assert meta["calibration"]["kind"] == "real" and meta["calibration"]["images"] == 20


def test_noise_needs_no_run_and_fdda_trains_a_resumable_generator(run, tmp_path, capsys):
    model, onnx = run
    code, out, err = quantize(capsys, str(onnx), "--out", str(tmp_path / "n.onnx"), "--calibration", "noise",
                              "--images", "8")  # fmt: skip
    assert code == 0 and "noise images" in out and "no --run" in err
    args = [str(onnx), "--out", str(tmp_path / "f.onnx"), "--calibration", "fdda", "--images", "8",
            "--run", str(model), "--generator-steps", "4", "--work", str(tmp_path / "gen")]  # fmt: skip
    code, out, err = quantize(capsys, *args)
    assert code == 0, err
    assert "generator epoch 1/1" in out
    assert json.loads((tmp_path / "gen" / "final_eval.json").read_text())["method"] == "fdda"
    meta = OnnxModel(tmp_path / "f.onnx").session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["dynaslice.quantization"])["calibration"]["kind"] == "fdda"
    code, out, _ = quantize(capsys, *args, "--force")  # the generator run is finished: reused
    assert code == 0 and "generator epoch" not in out  # the engine prints "generator epoch 1/1: ..." while training


@pytest.mark.parametrize(
    "case,needle",
    [
        ("foreign", "is not a dynaslice ONNX artifact"),
        ("no_run", "--calibration real needs --run"),
        ("too_many", "asked for 5000 real calibration images"),
        ("shape", "takes images of shape [1, 8, 8], the run's dataset has [1, 12, 12]"),
        ("missing_run", "not found"),
    ],
)
def test_mistakes_get_one_line_and_exit_2(run, tmp_path, capsys, case, needle):
    model, onnx = run
    args = [str(onnx), "--out", str(tmp_path / "q.onnx"), "--calibration", "real", "--run", str(model)]
    if case == "foreign":
        (tmp_path / "foreign.onnx").write_bytes(b"not onnx")
        args[0] = str(tmp_path / "foreign.onnx")
    elif case == "no_run":
        args = args[:-2]
    elif case == "too_many":
        args += ["--images", "5000"]
    elif case == "shape":
        other = tmp_path / "other.safetensors"
        tensors, meta = ds.modelfile.load_model_file(model)
        meta["config"]["data"]["image_size"] = 12
        save_model_file(other, tensors, meta)
        args[-1] = str(other)
    else:
        args[-1] = str(tmp_path / "nothing")
    code, _, err = quantize(capsys, *args)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()
