"""DS-Net gates on networks converted by ``make_supernet``: ``model.gate.cut`` names the module
whose output the gate reads; the program is split there (trunk before, routes after), the
default cut follows the documented rule, every bad cut is one line naming the cuts there are,
and Stage II, the gated ONNX package and ``serve.load`` work as they do for the zoo."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import yaml
from test_onnx import spread_routes
from test_reliability import FAST, cli, one_line_error
from torch import nn

import dynaslice as ds
from dynaslice import serve
from dynaslice.dynamic import DynamicNet
from dynaslice.gate import GatedSupernet
from dynaslice.graph import GraphError
from dynaslice.onnx_export import export_gated

torch.set_num_threads(1)
SIDE = 16
FACTORY = "test_converted_gate:tiny"  # this module, named in configs like a user's own factory


class Block(nn.Module):
    """A ResNet basic block: two 3x3 convs and a shortcut (a 1x1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        same = stride == 1 and cin == cout
        self.down = nn.Identity() if same else nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.down(x))


class Tiny(nn.Module):
    """Stem at full size, then blocks at 1, 1/2 and 1/4 of it; block1 ends at ~40 % of the MACs."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1, self.block2, self.block3 = Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Mixer(nn.Module):
    """Tokens of one size throughout (patches, residual MLP blocks, mean)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.embed = nn.Conv2d(in_chans, 16, 4, 4)
        self.blocks = nn.Sequential(Residual(16), Residual(16), Residual(16), Residual(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


class Flat(nn.Module):
    """Feature maps of one size and no tokens: no stage ends, so no default cut."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU())
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return Tiny(num_classes, in_chans)


def flat(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return Flat(num_classes, in_chans)


def convert(model: nn.Module) -> ds.Supernet:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups kept whole: not what these tests are about
        return ds.make_supernet(model, torch.randn(1, 1, SIDE, SIDE), ratios=[0.5, 0.75, 1.0])


@pytest.fixture(scope="module")
def net() -> ds.Supernet:
    torch.manual_seed(0)
    return convert(Tiny()).eval()


def x_batch(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(n))


# --------------------------------------------------------------------------- the split


def test_split_at_a_module_runs_the_same_network_in_two_stages(net):
    split = net.split("block2")
    assert (net.n_stages, split.n_stages) == (1, 2)
    before, after = set(split.stage_dims(0)), set(split.stage_dims(1))
    assert {"stem.0", "block1.conv1"} <= before - after  # read only before the cut
    assert "block3.conv1" in after - before
    assert "block2.conv2" in before & after  # block2's output channels: the features at the cut
    x = x_batch()
    with torch.no_grad():
        for arch in (net.space.smallest(), net.space.uniform(0.75), net.space.largest()):
            want = net(x, arch)
            assert torch.equal(split(x, arch), want)
            assert torch.equal(split.forward_from(split.forward_to(x, arch, 1), arch, 1), want)
    assert all(a is b for a, b in zip(split.parameters(), net.parameters(), strict=True))  # the same weights


def test_gate_at_a_module_path_pins_the_trunk_and_routes_the_rest(net):
    gated = GatedSupernet(net, cut="block2", routes=3).eval()
    assert (gated.cut, gated.cut_spec, gated.spec()["cut"]) == (1, "block2", "block2")
    assert gated.gate.channels == 32  # block2's output channels
    pinned = gated.net.dims_before(1)
    assert all(r[d] == net.space[d].max for r in gated.routes for d in pinned)
    assert gated.routes[0]["block3.conv1"] < gated.routes[-1]["block3.conv1"]
    x = x_batch()
    with torch.no_grad():
        h, logits = gated.trunk(x)
        assert logits.shape == (6, 3)
        for r, arch in enumerate(gated.routes):
            assert torch.allclose(gated.forward_route(h, r), gated(x, arch), atol=1e-6)
        index = torch.tensor([0, 2, 1, 1, 0, 2])
        mixed = gated.forward_routes(h, index)
        for i, r in enumerate(index.tolist()):
            assert torch.allclose(mixed[i], gated.forward_route(h[i : i + 1], r)[0], atol=1e-6)


def test_default_cut_is_the_stage_end_nearest_half_the_macs(net):
    # ends of the 16, 8, 4 and 1-pixel stages: block1 (~40 % of the MACs), block2 (~70 %), block3, pool
    assert GatedSupernet(net, routes=2).cut_spec == "block1"
    assert net.default_gate_path() == "block1"


@pytest.mark.parametrize(
    ("name", "cut"),
    [
        ("resnet18", "layer2"),  # where the zoo's ResNets route: after their second stage
        ("mobilenet_v2", "features.6"),  # the end of the 32-channel stage, not block 7's expansion after it
    ],
)
def test_default_cut_of_torchvision_networks(name, cut):
    torchvision = pytest.importorskip("torchvision")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = ds.make_supernet(getattr(torchvision.models, name)(num_classes=10), torch.randn(1, 3, 64, 64))
    assert net.default_gate_path() == cut


@pytest.mark.parametrize(
    ("cut", "needle"),
    [
        ("block1.conv1", "is inside a residual block or a branch: stem_2, computed before it, is still used"),
        ("block2.down", "is inside a residual block or a branch"),
        ("fc", "is the classifier or after it (its output has shape [1, 10])"),
        ("nosuch", "is not a module of Tiny"),
        ("block1.relu.x", "is not a module of Tiny"),
        (0, "sits at a module's output, named by its path"),
        (1, "sits at a module's output, named by its path"),
    ],
)
def test_a_bad_cut_is_one_line_naming_the_cuts_there_are(net, cut, needle):
    with pytest.raises(GraphError) as info:
        GatedSupernet(net, cut=cut, routes=2)
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert message.endswith("the cuts there are: stem.0, stem.1, stem, block1, block2, block3, pool")


def test_tokens_route_after_the_block_nearest_a_quarter_of_the_macs():
    net = convert(Mixer())  # the embedding ~6 % of the MACs, then four blocks of ~23 % each
    gated = GatedSupernet(net, routes=2)
    assert gated.gate.tokens and gated.cut_spec == "blocks.0"
    assert GatedSupernet(net, cut="blocks.2", routes=2).cut_spec == "blocks.2"


def test_maps_of_one_size_have_no_default_cut_but_take_an_explicit_one():
    net = convert(Flat())
    with pytest.raises(GraphError, match=r"Flat has no default gate cut .* the cuts there are: features.0, .*pool$"):
        GatedSupernet(net, routes=2)
    assert GatedSupernet(net, cut="features.1", routes=2).cut_spec == "features.1"


def test_a_zoo_net_refuses_a_module_path():
    zoo = ds.create_supernet("resnet_small", input_size=8)
    with pytest.raises(ValueError, match="is cut at a stage number"):
        GatedSupernet(zoo, cut="layer2", routes=2)


# --------------------------------------------------------------------------- export and serving


def test_gated_package_and_serve_load_equal_the_eager_gated_model(net, tmp_path):
    gated = GatedSupernet(net, cut="block2", routes=3).eval()
    x = x_batch(12)
    with torch.no_grad():
        spread_routes(gated, x)
        want, want_routes = DynamicNet(gated).forward_with_routes(x)
    assert len(set(want_routes.tolist())) == 3
    export_gated(DynamicNet(gated), tmp_path / "pkg")
    served = serve.load(tmp_path / "pkg")
    got, got_routes = served.forward_with_routes(x.numpy())
    np.testing.assert_array_equal(got_routes, want_routes.numpy())
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- the commands


def write(folder, name: str = FACTORY, **gate) -> str:
    data = {k: dict(v) for k, v in FAST.items()}
    data["data"].update(image_size=SIDE)
    data["model"] = {"name": name, "kwargs": {"ratios": [0.5, 1.0]}, "gate": {"enabled": True, "routes": 2, **gate}}
    data["stage2"] = {"epochs": 1, "target_macs": 0.9}
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage1_stage2_export_and_serve_through_the_commands(tmp_path):
    run, gate, pkg = tmp_path / "run", tmp_path / "gate", tmp_path / "pkg"
    rc, _, err = cli("train", write(tmp_path, cut="block2"), "--out", run)
    assert rc == 0, err
    trust = ("--trust-factory", FACTORY)
    rc, out, err = cli("train-gate", run, "--out", gate, *trust)
    assert rc == 0 and "Stage II done" in out, err
    rc, _, err = cli("export", gate, "--gated", "--out", pkg, *trust)
    assert rc == 0, err
    gated, meta = ds.load_supernet(gate, trust=[FACTORY])
    assert meta["model"]["gate"]["cut"] == "block2" and gated.cut_spec == "block2"
    x = x_batch(8)
    with torch.no_grad():
        want, want_routes = DynamicNet(gated.eval()).forward_with_routes(x)
    got, got_routes = serve.load(pkg).forward_with_routes(x.numpy())
    np.testing.assert_array_equal(got_routes, want_routes.numpy())
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


def test_dynaslice_run_on_a_user_factory_at_the_default_cut(tmp_path):
    """``dynaslice run`` imports the factory its config names (the user chose it) and places the
    gate at the default cut; the eval JSON, the model files and the exported package record it."""
    cfg = write(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**data, "run": {"gate_targets": [0.9]}}))
    run = tmp_path / "run"
    rc, _, err = cli("run", cfg, "--out", run, "--until", "export")
    assert rc == 0, err
    gated, meta = ds.load_supernet(run / "gate-t0.9", trust=[FACTORY])
    assert meta["model"]["gate"]["cut"] == "block1"  # recorded: a later rule cannot move a trained gate
    assert yaml.safe_load((run / "eval" / "gate-t0.9.json").read_text())["cut"] == "block1"
    x = x_batch(8)
    with torch.no_grad():
        want, want_routes = DynamicNet(gated.eval()).forward_with_routes(x)
    got, got_routes = serve.load(run / "export" / "gated").forward_with_routes(x.numpy())
    np.testing.assert_array_equal(got_routes, want_routes.numpy())
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "gate", "needle"),
    [
        (FACTORY, {"cut": "block1.conv1"}, "is inside a residual block or a branch"),
        (FACTORY, {"cut": "nosuch"}, "is not a module of Tiny"),
        (FACTORY, {"cut": "fc"}, "is the classifier or after it"),
        (FACTORY, {"cut": 2}, "sits at a module's output"),
        ("test_converted_gate:flat", {}, "Flat has no default gate cut"),
    ],
)
def test_bad_cuts_in_a_config_are_one_line(tmp_path, name, gate, needle):
    line = one_line_error(cli("train", write(tmp_path, name, **gate), "--out", tmp_path / "run"), needle)
    assert line.startswith("dynaslice train: error: model.gate: gate cut") or "no default gate cut" in line
    assert "the cuts there are:" in line
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize(
    ("cut", "needle"),
    [
        ("layer2", "model.gate: gate cut 'layer2': DSResNet is cut at a stage number (0..3)"),
        (-1, "model.gate.cut=-1 is out of range: use a stage number >= 0, or a module path"),
    ],
)
def test_a_zoo_net_s_bad_cut_in_a_config_is_one_line(tmp_path, cut, needle):
    cfg = write(tmp_path, "resnet_small", cut=cut)
    one_line_error(cli("train", cfg, "--out", tmp_path / "run"), needle)
    assert not (tmp_path / "run").exists()
