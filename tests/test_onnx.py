"""ONNX export and the onnxruntime runners: exported subnets equal ``net(x, arch)``, a gated
package run by GatedOnnxRunner equals DynamicNet, damaged packages fail clearly, and the runtime
works where torch is not installed."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dynaslice as ds
from dynaslice import onnx_export, onnx_package
from dynaslice.dynamic import DynamicNet
from dynaslice.gate import GatedSupernet
from dynaslice.onnx_export import export_gated, export_onnx
from dynaslice.onnx_package import GatedOnnxRunner, OnnxModel

FAMILIES = {
    "resnet_small": dict(in_chans=1, input_size=28),
    "mobilenet_v2_small": {},
    "vit_small_input": {},
}
ATOL = 1e-4


def make_net(name: str, seed: int = 0) -> ds.Supernet:
    """A supernet with non-trivial norm statistics and affine parameters, so a wrong slice shows."""
    if name not in ds.list_supernets():
        pytest.skip(f"{name} is not registered")
    torch.manual_seed(seed)
    net = ds.create_supernet(name, num_classes=10, **FAMILIES[name])
    with torch.no_grad():
        for pname, t in list(net.named_parameters()) + list(net.named_buffers()):
            if pname.endswith(("running_mean", "bias")):
                t.normal_(0, 0.2)
            elif pname.endswith("running_var") or (pname.endswith("weight") and t.dim() == 1):
                t.uniform_(0.5, 2.0)
    return net.eval()


@torch.no_grad()
def spread_routes(gated: GatedSupernet, x: torch.Tensor, skip: tuple[int, ...] = ()) -> None:
    """Set the slimming head so the samples of ``x`` spread over the routes (``skip``: none there).

    Logit ``r`` is ``r * s - (t_1 + ... + t_r)`` for a projection ``s`` of the gate's hidden
    features and thresholds ``t`` halfway between samples: the argmax is the number of thresholds
    below ``s``, with clear margins, so float differences between runtimes cannot flip a route.
    """
    gate = gated.gate
    z = gate.squeeze(gated.net.forward_to(x, gated.routes[0], gated.cut)).flatten(1)
    u = torch.randn(z.shape[1], generator=torch.Generator().manual_seed(0))
    s = (z @ u).sort().values
    k, n = len(gated.routes), x.shape[0]
    t = torch.stack([(s[i - 1] + s[i]) / 2 for i in (round(j * n / k) for j in range(1, k))])
    bias = torch.cat([torch.zeros(1), -torch.cumsum(t, 0)])
    bias[list(skip)] = -1e4
    gate.slimming.weight.copy_((torch.arange(k, dtype=torch.float32)[:, None] * u)[:, :, None, None])
    gate.slimming.bias.copy_(bias)


# --------------------------------------------------------------------------- static subnets


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_subnets_equal_pytorch_at_batch_1_and_5(family, tmp_path):
    net = make_net(family)
    rng = random.Random(0)
    x = torch.randn(5, *net.input_size, generator=torch.Generator().manual_seed(1))
    for i in range(3):
        arch = net.space.sample(rng)
        path = export_onnx(net, arch, tmp_path / f"sub{i}.onnx")
        model = OnnxModel(path)
        assert model.input_shape == [None, *net.input_size] and model.arch == arch.to_dict()
        with torch.no_grad():
            want = net(x, arch).numpy()
        assert np.abs(want).max() > 1e-2  # a real signal, not all zeros
        np.testing.assert_allclose(model(x[:1].numpy()), want[:1], rtol=0, atol=ATOL)
        np.testing.assert_allclose(model(x.numpy()), want, rtol=0, atol=ATOL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sub0.onnx",
        "sub1.onnx",
        "sub2.onnx",
    ]  # no temp files
    assert not net.training  # the supernet was not touched


def test_dynamo_exporter_and_fixed_batch(tmp_path):
    net = make_net("resnet_small")
    arch = net.space.sample(random.Random(3))
    x = torch.randn(5, *net.input_size)
    with torch.no_grad():
        want = net(x, arch).numpy()
    model = OnnxModel(export_onnx(net, arch, tmp_path / "d.onnx", exporter="dynamo"))
    np.testing.assert_allclose(model(x[:1].numpy()), want[:1], rtol=0, atol=ATOL)
    np.testing.assert_allclose(model(x.numpy()), want, rtol=0, atol=ATOL)

    fixed = OnnxModel(export_onnx(net, arch, tmp_path / "f.onnx", batch_dynamic=False))
    assert fixed.input_shape == [1, *net.input_size]
    np.testing.assert_allclose(fixed(x[:1].numpy()), want[:1], rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match=r"expects input of shape \[1, 1, 28, 28\], got \[5, 1, 28, 28\]"):
        fixed(x.numpy())
    with pytest.raises(ValueError, match="exporter must be"):
        export_onnx(net, arch, tmp_path / "x.onnx", exporter="tflite")  # type: ignore[arg-type]


def test_export_of_a_training_supernet_is_in_eval_mode(tmp_path):
    net = make_net("resnet_small").train()
    arch = net.space.smallest()
    model = OnnxModel(export_onnx(net, arch, tmp_path / "s.onnx"))
    assert net.training  # modes restored
    x = torch.randn(3, *net.input_size)
    with torch.no_grad():
        want = net.eval()(x, arch).numpy()  # eval: running statistics, as exported
    np.testing.assert_allclose(model(x.numpy()), want, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- the gated package


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A resnet_small gated package with a forced mix of routes (route 1 empty), and its DynamicNet."""
    net = make_net("resnet_small")
    gated = GatedSupernet(net, routes=4)
    x = torch.randn(12, *net.input_size, generator=torch.Generator().manual_seed(2))
    spread_routes(gated, x, skip=(1,))
    directory = tmp_path_factory.mktemp("pkg") / "resnet_gated"
    export_gated(DynamicNet(gated), directory, mean=[0.286], std=[0.353])
    return directory, DynamicNet(gated), x


def test_gated_runner_equals_dynamic_net(package):
    directory, dyn, x = package
    runner = GatedOnnxRunner(directory)
    with torch.no_grad():
        want, want_routes = dyn.forward_with_routes(x)
    out, routes = runner.forward_with_routes(x.numpy())
    np.testing.assert_array_equal(routes, want_routes.numpy())
    counts = runner.route_counts(routes)
    assert counts[1] == 0 and sum(c > 0 for c in counts) == 3 and sum(counts) == 12
    np.testing.assert_allclose(out, want.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(runner.route(x.numpy()), routes)
    np.testing.assert_allclose(runner(x[:1].numpy()), want[:1].numpy(), rtol=0, atol=ATOL)  # batch 1
    forced = np.array([0, 3, 3, 0, 2, 1, 0, 0, 1, 2, 3, 3])
    with torch.no_grad():
        want_forced, _ = dyn.forward_with_routes(x, torch.from_numpy(forced))
    np.testing.assert_allclose(
        runner.forward_with_routes(x.numpy(), forced)[0], want_forced.numpy(), rtol=0, atol=ATOL
    )
    assert runner.avg_macs(routes) == pytest.approx(dyn.avg_macs(want_routes))


def test_serve_load_runs_a_package_through_its_runner(package):
    """serve.load opens a package with the onnxruntime form (open_package: the runner for the
    manifest's format, its sessions on the asked threads) and answers exactly what the runner
    answers, at batch 12 with a mix of routes and with forced routes, as numpy and as tensors."""
    from dynaslice import serve

    directory, _, x = package
    runner = onnx_package.open_package(directory, threads=1)
    assert isinstance(runner, GatedOnnxRunner)
    assert runner.trunk.get_session_options().intra_op_num_threads == 1
    served = serve.load(directory)
    forced = np.array([0, 3, 3, 0, 2, 1, 0, 0, 1, 2, 3, 3])
    for routes in (None, forced):
        want, want_routes = runner.forward_with_routes(x.numpy(), routes)
        got, got_routes = served.forward_with_routes(x.numpy(), routes)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_routes, want_routes)
    np.testing.assert_array_equal(served(x).numpy(), runner(x.numpy()))


def test_manifest_content(package):
    directory, dyn, _ = package
    gated = dyn.gated
    m = json.loads((directory / "manifest.json").read_text())
    assert m["format"] == "dynaslice-gated-onnx" and m["format_version"] == 1
    assert m["family"] == "DSResNet" and m["num_classes"] == 10 and m["cut"] == gated.cut
    assert m["input"] == {
        "name": "input",
        "shape": [None, 1, 28, 28],
        "dtype": "float32",
        "mean": [0.286],
        "std": [0.353],
    }
    assert m["trunk"]["file"] == "trunk.onnx" and m["trunk"]["outputs"] == ["features", "logits"]
    assert [r["arch"] for r in m["routes"]] == [r.to_dict() for r in gated.routes]
    assert [r["macs"] for r in m["routes"]] == [int(v) for v in gated.route_macs()]
    assert [r["file"] for r in m["routes"]] == [f"route_{i}.onnx" for i in range(4)]
    assert m["gate_macs"] == gated.gate.macs() and isinstance(m["opset"], int)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["manifest.json", "trunk.onnx"] + [f"route_{i}.onnx" for i in range(4)]
    )
    assert sorted(p.name for p in directory.parent.iterdir()) == ["resnet_gated"]  # no temp dirs left


def test_token_family_gated_package(tmp_path):
    """A ViT trunk outputs tokens [B, N, C]; routes differ in depth after the gate."""
    net = make_net("vit_small_input")
    largest = net.space.largest().to_dict()
    gated = GatedSupernet(net, cut=1, routes=[{**largest, "depth": d} for d in (4, 5, 6)])
    x = torch.randn(9, *net.input_size, generator=torch.Generator().manual_seed(3))
    spread_routes(gated, x)
    dyn = DynamicNet(gated)
    runner = GatedOnnxRunner(export_gated(gated, tmp_path / "vit"))
    with torch.no_grad():
        want, want_routes = dyn.forward_with_routes(x)
    out, routes = runner.forward_with_routes(x.numpy())
    assert len(np.unique(routes)) == 3
    np.testing.assert_array_equal(routes, want_routes.numpy())
    np.testing.assert_allclose(out, want.numpy(), rtol=0, atol=ATOL)


def _copy(package_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(package_dir, target)
    return target


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def test_damaged_packages_fail_clearly(package, tmp_path):
    directory, _, x = package
    with pytest.raises(FileNotFoundError, match="not a dynaslice ONNX package"):
        GatedOnnxRunner(tmp_path)

    d = _copy(directory, tmp_path / "a")
    (d / "manifest.json").write_text('{"format": "dynaslice-gated-onnx", "format_')
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        GatedOnnxRunner(d)

    d = _copy(directory, tmp_path / "b")
    _edit_manifest(d, lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="format_version 99.*upgrade dynaslice"):
        GatedOnnxRunner(d)

    d = _copy(directory, tmp_path / "c")
    _edit_manifest(d, lambda m: m.pop("routes"))
    with pytest.raises(ValueError, match="'routes' is missing"):
        GatedOnnxRunner(d)

    d = _copy(directory, tmp_path / "g")
    _edit_manifest(d, lambda m: m["input"].update(dtype="float17"))
    with pytest.raises(ValueError, match="'float17' is not a numpy dtype"):
        GatedOnnxRunner(d)

    d = _copy(directory, tmp_path / "d")
    _edit_manifest(d, lambda m: m["routes"][2].update(file="../trunk.onnx"))
    with pytest.raises(ValueError, match="not a plain file name"):
        GatedOnnxRunner(d)

    d = _copy(directory, tmp_path / "e")
    (d / "route_2.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="route_2.onnx is missing"):
        GatedOnnxRunner(d)

    d = _copy(directory, tmp_path / "f")
    data = (d / "route_0.onnx").read_bytes()
    (d / "route_0.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not load ONNX model .*route_0.onnx.*re-export"):
        GatedOnnxRunner(d)

    runner = GatedOnnxRunner(directory)
    with pytest.raises(
        ValueError, match=r"expects input of shape \[batch, 1, 28, 28\], got \[2, 3, 28, 28\]"
    ):
        runner(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        runner(np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match="outside 0..3"):
        runner.forward_with_routes(x[:2].numpy(), np.array([0, 4]))


def test_export_gated_is_complete_or_absent(package, tmp_path, monkeypatch):
    _, dyn, _ = package
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a dynaslice ONNX package"):
        export_gated(dyn, busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(TypeError, match="GatedSupernet"):
        export_gated(dyn.gated.net, tmp_path / "x")
    with pytest.raises(ValueError, match="both mean and std"):
        export_gated(dyn, tmp_path / "x", mean=[0.5])

    real = onnx_export._export_module

    def fail_on_route_1(module, path, *args, **kwargs):
        if path.name == "route_1.onnx":
            raise RuntimeError("disk full")
        return real(module, path, *args, **kwargs)

    # an earlier package is replaced whole, or kept whole when the new export fails
    earlier = _copy(package[0], tmp_path / "p")
    export_gated(dyn, earlier, mean=[0.5], std=[0.25])
    assert json.loads((earlier / "manifest.json").read_text())["input"]["mean"] == [0.5]
    assert GatedOnnxRunner(earlier).num_classes == 10
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    monkeypatch.setattr(onnx_export, "_export_module", fail_on_route_1)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gated(dyn, earlier, mean=[0.1], std=[0.2])
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    with pytest.raises(RuntimeError, match="disk full"):
        export_gated(dyn, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "p"]  # no "new", no temp dirs
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["copy"]


# --------------------------------------------------------------------------- no torch needed


def test_runtime_runs_without_torch(package, tmp_path):
    """onnx_package.py, loaded alone with torch made unimportable, runs the package to the same result."""
    directory, dyn, x = package
    np.save(tmp_path / "x.npy", x.numpy())
    code = f"""
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
import importlib.util
import numpy as np
spec = importlib.util.spec_from_file_location("ds_runtime", {str(Path(onnx_package.__file__))!r})
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
out, routes = rt.GatedOnnxRunner({str(directory)!r}).forward_with_routes(np.load({str(tmp_path / "x.npy")!r}))
np.save({str(tmp_path / "out.npy")!r}, out)
np.save({str(tmp_path / "routes.npy")!r}, routes)
assert sys.modules["torch"] is None and not any(m.startswith("dynaslice") for m in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        want, want_routes = dyn.forward_with_routes(x)
    np.testing.assert_array_equal(np.load(tmp_path / "routes.npy"), want_routes.numpy())
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want.numpy(), rtol=0, atol=ATOL)
