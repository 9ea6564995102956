"""The serving layer: every artifact on every runtime computes what eager PyTorch computes, and
nothing is built per call (sessions, scripted graphs and CUDA graphs are made at load)."""

from __future__ import annotations

import copy

import pytest
import torch

import dynaslice as ds
from dynaslice import serve
from dynaslice.budget import BudgetEntry
from dynaslice.onnx_export import export_budget, export_gated, export_onnx
from dynaslice.train.bn import bn_statistics

CPU_RUNTIMES = [r for r in ("eager", "frozen", "onnxruntime") if r in serve.available_runtimes("cpu")]
ATOL = 1e-4


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    net = ds.create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=12, ratios=[0.5, 0.75, 1.0])
    with torch.no_grad():  # non-trivial BN statistics, so a runtime that drops them would be caught
        for m in net.modules():
            if isinstance(m, ds.nn.SlicedBatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def budget(net):
    net = copy.deepcopy(net)  # BudgetNet switches BN statistics in its net: keep the shared one intact
    archs = [net.space.smallest(), net.space.uniform(0.75), net.space.largest()]
    entries = [
        BudgetEntry(bucket=i, arch=a, macs=int(ds.count_macs(net, a)), val_accuracy=50.0 + 10 * i)
        for i, a in enumerate(archs)
    ]
    stats = []
    for shift in (0.0, 0.1, 0.2):  # each entry its own statistics, as a PSS table has
        s = bn_statistics(net)
        stats.append({k: v + shift if k.endswith("mean") else v for k, v in s.items()})
    return ds.BudgetNet(net, ds.BudgetTable(entries), stats).eval()


@pytest.fixture(scope="module")
def gated(net):
    torch.manual_seed(1)
    return ds.GatedSupernet(copy.deepcopy(net), cut=1, routes=3).eval()


def x_batch(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_subnet_on_each_runtime_equals_eager(net, runtime):
    arch = net.space.uniform(0.75)
    served = serve.serve_subnet(net, arch, runtime)
    assert served.runtime == runtime and served.macs == ds.count_macs(net, arch)
    for n in (1, 5):
        with torch.no_grad():
            assert torch.allclose(served(x_batch(n)), net(x_batch(n), arch), atol=ATOL)


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_budget_table_on_each_runtime_switches_like_budget_net(budget, runtime):
    served = serve.serve_budget(budget, runtime)
    x = x_batch()
    for limit in (None, budget.table.entries[1].macs, budget.table.entries[0].macs):
        assert served.entry(max_macs=limit) == budget.entry(max_macs=limit)
        with torch.no_grad():
            assert torch.allclose(served(x, max_macs=limit), budget(x, max_macs=limit), atol=ATOL)
    with pytest.raises(ValueError, match="cheapest needs"):
        served(x, max_macs=1)


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_gated_model_on_each_runtime_groups_by_route_like_dynamic_net(gated, runtime):
    served = serve.serve_gated(gated, runtime)
    dyn = ds.DynamicNet(gated)
    x = x_batch(9)
    mixed = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1])  # every route, interleaved
    with torch.no_grad():
        want, want_routes = dyn.forward_with_routes(x)
        forced, _ = dyn.forward_with_routes(x, mixed)
    got, routes = served.forward_with_routes(x)
    assert torch.equal(routes, want_routes) and torch.allclose(got, want, atol=ATOL)  # the gate's choice
    assert torch.allclose(served.forward_with_routes(x, mixed)[0], forced, atol=ATOL)  # grouped and put back
    assert served.avg_macs(mixed) == pytest.approx(dyn.avg_macs(mixed))


def _check_gated_batch_one(served, dyn, n_routes):
    """Every sample alone (onnxruntime's batch-1 path) and the batch together (grouped) give eager's
    logits and routes, with the gate's choice and with every route forced."""
    x = x_batch(6)
    with torch.no_grad():
        want, want_routes = dyn.forward_with_routes(x)
        forced = {r: dyn.forward_with_routes(x, torch.full((6,), r))[0] for r in range(n_routes)}
    got, routes = served.forward_with_routes(x)
    assert torch.equal(routes, want_routes) and torch.allclose(got, want, atol=ATOL)
    for i in range(6):
        one, route = served.forward_with_routes(x[i : i + 1])
        assert route.dtype == torch.long and torch.equal(route, want_routes[i : i + 1])
        assert one.shape == (1, want.shape[1]) and torch.allclose(one, want[i : i + 1], atol=ATOL)
        assert torch.equal(served.route(x[i : i + 1]), route)
        for r in range(n_routes):
            pick = torch.tensor([r])
            one, route = served.forward_with_routes(x[i : i + 1], pick)
            assert torch.equal(route, pick) and torch.allclose(one, forced[r][i : i + 1], atol=ATOL)
    for bad, match in ((torch.tensor([n_routes]), f"outside 0..{n_routes - 1}"), (torch.tensor([-1]), "outside"),
                       (torch.tensor([0.0]), "LongTensor of shape"), (torch.tensor([0, 1]), "LongTensor of shape")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            served.forward_with_routes(x[:1], bad)


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_gated_model_at_batch_one_equals_eager_per_sample(gated, runtime):
    """Batch 1 takes its own path (on onnxruntime, no torch op between the two sessions)."""
    served = serve.serve_gated(gated, runtime)
    assert served._numpy == (runtime == "onnxruntime")
    _check_gated_batch_one(served, ds.DynamicNet(gated), len(gated.routes))


def test_gated_packages_float_and_int8_at_batch_one(tmp_path, gated):
    """A gated package loaded with serve.load takes the batch-1 path too, float and int8 (quantize's
    package: same files, QDQ graphs); int8 agrees with the package's own numpy runner."""
    if "onnxruntime" not in CPU_RUNTIMES:
        pytest.skip("onnxruntime is not installed")
    import numpy as np

    from dynaslice.onnx_package import GatedOnnxRunner
    from dynaslice.quant import quantize_artifact

    package = export_gated(gated, tmp_path / "gated")
    served = serve.load(package)
    assert served._numpy
    _check_gated_batch_one(served, ds.DynamicNet(gated), len(gated.routes))

    images = np.random.default_rng(0).standard_normal((32, 1, 12, 12)).astype(np.float32)
    int8 = serve.load(quantize_artifact(package, tmp_path / "gated_int8", images))
    runner = GatedOnnxRunner(tmp_path / "gated_int8")
    x = x_batch(6)
    want, want_routes = runner.forward_with_routes(x.numpy())
    batch, batch_routes = int8.forward_with_routes(x)
    assert np.array_equal(batch_routes.numpy(), want_routes) and np.allclose(batch.numpy(), want, atol=ATOL)
    for i in range(6):
        one, route = int8.forward_with_routes(x[i : i + 1])
        assert int(route) == want_routes[i] and np.allclose(one.numpy(), want[i : i + 1], atol=ATOL)
        for r in range(len(gated.routes)):
            want_r = runner.forward_with_routes(x[i : i + 1].numpy(), np.array([r]))[0]
            one = int8.forward_with_routes(x[i : i + 1], torch.tensor([r]))[0]
            assert np.allclose(one.numpy(), want_r, atol=ATOL)


def test_exported_packages_load_on_onnxruntime_and_match(tmp_path, net, budget, gated):
    if "onnxruntime" not in CPU_RUNTIMES:
        pytest.skip("onnxruntime is not installed")
    x = x_batch(7)
    export_gated(gated, tmp_path / "gated")
    export_budget(budget, tmp_path / "budget")
    export_onnx(net, net.space.largest(), tmp_path / "largest.onnx")
    with torch.no_grad():
        assert torch.allclose(serve.load(tmp_path / "gated")(x), ds.DynamicNet(gated)(x), atol=ATOL)
        table = serve.load(tmp_path / "budget")
        mid = budget.table.entries[1].macs
        assert isinstance(table, serve.ServedBudget) and table.entry(max_macs=mid) == budget.entry(max_macs=mid)
        assert torch.allclose(table(x, max_macs=mid), budget(x, max_macs=mid), atol=ATOL)
        assert torch.allclose(serve.load(tmp_path / "largest.onnx")(x), net(x, net.space.largest()), atol=ATOL)
    with pytest.raises(ValueError, match="runs on onnxruntime"):
        serve.load(tmp_path / "gated", runtime="frozen")


def test_nothing_is_built_per_call(monkeypatch, tmp_path, budget, gated):
    """Inference sessions and scripted graphs are created at load, never in the 100 calls after."""
    if "onnxruntime" not in CPU_RUNTIMES:
        pytest.skip("onnxruntime is not installed")
    import onnxruntime

    made = {"sessions": 0, "scripts": 0}
    real_session, real_script = onnxruntime.InferenceSession, torch.jit.script

    def session(*args, **kwargs):
        made["sessions"] += 1
        return real_session(*args, **kwargs)

    depth = [0]

    def script(*args, **kwargs):
        # only the calls serving makes: torch's recursive scripting calls torch.jit.script again for
        # classes it has not compiled yet in this process (so the count depended on the tests before)
        made["scripts"] += depth[0] == 0
        depth[0] += 1
        try:
            return real_script(*args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(torch.jit, "script", script)
    export_gated(gated, tmp_path / "gated")
    models = [serve.load(tmp_path / "gated"), serve.serve_gated(gated, "frozen"), serve.serve_budget(budget, "frozen"),
              serve.serve_budget(budget, "onnxruntime")]  # fmt: skip
    at_load = dict(made)
    assert at_load["sessions"] == 4 + 3 and at_load["scripts"] == 4 + 3  # trunk + 3 routes; 3 budget entries
    macs = [e.macs for e in budget.table.entries]
    for i in range(100):
        x = x_batch(1 + i % 7)  # batch 1 too: the gated models' batch-1 path, gate-chosen and forced
        for m in models:
            if isinstance(m, serve.ServedBudget):
                m(x, max_macs=macs[i % 3])
            else:
                m(x)
                m.forward_with_routes(x, torch.full((len(x),), i % 3))
    assert made == at_load


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_equal_eager_and_are_captured_once_per_padded_shape(gated):
    g = gated.to("cuda")
    served = serve.serve_gated(g, "cudagraph", device="cuda")
    x = x_batch(9).cuda()
    with torch.no_grad():
        assert torch.allclose(served(x), ds.DynamicNet(g)(x), atol=1e-3)
    for _ in range(10):
        served(x)
    assert len(served.trunk.graphs) == 1  # batch 9 padded to 16: one graph, replayed


def test_runtime_names_and_load_errors(tmp_path, net):
    assert serve.resolve_runtime("auto", "cpu") == serve.PREFERRED["cpu"][0] or "onnxruntime" not in CPU_RUNTIMES
    with pytest.raises(ValueError, match="unknown runtime 'fast'"):
        serve.resolve_runtime("fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cudagraph' needs a CUDA device"):
            serve.resolve_runtime("cudagraph", "cpu")
    with pytest.raises(FileNotFoundError, match="not found"):
        serve.load(tmp_path / "nothing")
    from dynaslice.modelfile import prefixed, save_model_file

    meta = {"model": {"name": "resnet_small", "kwargs": {"in_chans": 1, "num_classes": 10, "input_size": 12,
                                                         "ratios": [0.5, 0.75, 1.0]}}}  # fmt: skip
    save_model_file(tmp_path / "m.safetensors", prefixed("model", net), meta)
    with pytest.raises(ValueError, match="pass arch="):
        serve.load(tmp_path / "m.safetensors", runtime="eager")
    sub = serve.load(tmp_path / "m.safetensors", runtime="eager", arch="x0.5")
    with torch.no_grad():
        assert torch.allclose(sub(x_batch()), net(x_batch(), net.space.uniform(0.5)), atol=ATOL)


def test_torch_compile_runtime_equals_eager(net):
    """torch.compile (inductor's CPU code generation: the first call compiles, which is slow)."""
    arch = net.space.smallest()
    served = serve.serve_subnet(net, arch, "compile")
    with torch.no_grad():
        assert torch.allclose(served(x_batch(2)), net(x_batch(2), arch), atol=ATOL)


def test_export_budget_table_command_writes_a_servable_package(tmp_path, capsys):
    from pathlib import Path

    from dynaslice.cli import main

    legacy = Path(__file__).parent / "data" / "legacy_v010" / "pss"
    assert main(["export", str(legacy), "--budget-table", "--out", str(tmp_path / "pkg")]) == 0
    budget = ds.BudgetNet.load(legacy).eval()
    served = serve.load(tmp_path / "pkg")
    x = torch.randn(3, *budget.net.input_size)
    for entry in budget.table.entries:
        with torch.no_grad():
            assert torch.allclose(served(x, max_macs=entry.macs), budget(x, max_macs=entry.macs), atol=ATOL)
    assert main(["export", str(legacy), "--budget-table", "--out", str(legacy / "budget_table.json")]) == 2
    assert "not a dynaslice ONNX package" in capsys.readouterr().err
