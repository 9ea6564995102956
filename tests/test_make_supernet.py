"""make_supernet: any traceable network as a supernet, with the zoo's contract.

Random weights (no downloads), small inputs. What must hold for every converted network: the
largest subnet is the model (1e-5 relative, on the model's own weights), the extracted narrowest
subnet computes exactly its slice, and the narrowest subnet is really smaller. Networks or parts
the channel-group engine cannot follow are kept whole or refused, in one line.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import dynaslice as ds
from dynaslice.counting import count_module_macs
from dynaslice.graph import GraphError, analyze, trace

SIDE = 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their defaults, so that a layer whose
    statistics or parameters were sliced wrongly would change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def convert(model: nn.Module, x: torch.Tensor, **kwargs) -> ds.ConvertedSupernet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.make_supernet(model, x, **kwargs)


TORCHVISION = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",  # SE gates with Hardsigmoid
    "efficientnet_b0",  # SE with SiLU, StochasticDepth
    "regnet_x_400mf",  # grouped convs
    "densenet121",  # concatenations, BatchNorm over them
    "squeezenet1_0",  # concatenations read by convs
]


@pytest.fixture(scope="module")
def converted():
    """Each torchvision model converted once for the whole module: (model, net, x)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model = randomised(getattr(torchvision.models, name)(num_classes=10))
            x = torch.randn(2, 3, SIDE, SIDE)
            cache[name] = (model, convert(model, x), x)
        return cache[name]

    return get


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_model_largest_is_the_model_and_the_narrowest_extracts_exactly(converted, name):
    model, net, x = converted(name)
    assert net.num_classes == 10 and net.input_size == (3, SIDE, SIDE)
    assert len(net.space.dims) >= 5, f"{name}: too little sliced ({net.kept})"
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), model(x)) <= 1e-5
        smallest = net.space.smallest()
        sliced = net(x, smallest)
        sub = ds.extract_subnet(net, smallest)
        assert rel_err(sub(x), sliced) <= 1e-5
    assert all(type(m).__module__.startswith(("torch.", "torchvision.")) for m in sub.modules())
    full = count_module_macs(model, (3, SIDE, SIDE))
    assert count_module_macs(sub, (3, SIDE, SIDE)) <= 0.5 * full


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_0"])  # analytic, and a sum of monomials
def test_count_macs_and_params_of_converted_nets_match_the_extracted_subnet(converted, name):
    model, net, x = converted(name)
    arch = net.space.uniform(0.5)
    sub = ds.extract_subnet(net, arch)
    assert ds.count_macs(net, arch) == count_module_macs(sub, (3, SIDE, SIDE))
    assert ds.count_params(net, arch) == sum(p.numel() for p in sub.parameters())
    assert ds.count_macs(net, net.space.largest()) == count_module_macs(model, (3, SIDE, SIDE))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_x_400mf", "squeezenet1_0"])
def test_converted_subnet_runs_the_same_in_onnxruntime(converted, tmp_path, name):
    ort = pytest.importorskip("onnxruntime")
    from dynaslice.onnx_export import export_onnx

    _, net, x = converted(name)
    arch = net.space.uniform(0.5)
    path = export_onnx(net, arch, tmp_path / f"{name}.onnx")
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = net(x, arch)
    assert rel_err(torch.from_numpy(got), want) <= 1e-4


def test_widths_follow_dsnet_grid_rounded_and_the_model_is_left_alone(converted):
    model, net, _ = converted("resnet18")
    # the stem feeds layer1's identity shortcuts: one tied group, named after its first producer
    assert net.space["conv1"].choices == ds.width_grid(64, ds.space.dsnet_ratios(), 8)
    assert all(c % 8 == 0 for d in net.space.dims for c in d.choices)
    assert net.conv1.weight.data_ptr() != model.conv1.weight.data_ptr()
    assert net.kept == {"fc": "the model's output"}  # the classes stay fixed


def test_channel_shuffle_keeps_those_groups_whole_and_says_so_in_one_line():
    torch.manual_seed(0)
    model = randomised(torchvision.models.shufflenet_v2_x0_5(num_classes=10))
    x = torch.randn(2, 3, SIDE, SIDE)
    with pytest.warns(UserWarning) as record:
        net = ds.make_supernet(model, x)
    (message,) = [str(w.message) for w in record if "full width" in str(w.message)]
    assert "\n" not in message and "ShuffleNetV2" in message and "reads the channel count" in message
    assert "stage2.0.branch2.0" in net.space.names  # the branches' inner widths are still sliced
    assert "stage2.0.branch2.5" in net.kept  # what goes through the shuffle is not
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), model(x)) <= 1e-5
        smallest = net.space.smallest()
        assert rel_err(ds.extract_subnet(net, smallest)(x), net(x, smallest)) <= 1e-5


class Custom(nn.Module):
    """Every tie the engine knows: an SE gate, a grouped conv with GroupNorm, a depthwise conv
    with channel multiplier 2, a concatenation normalised by BatchNorm and read by a conv,
    residual adds, a flatten of a 2x2 map into a Linear, LayerNorm and BatchNorm1d on features."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.grouped, self.gn = nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.GroupNorm(4, 32)
        self.se_reduce, self.se_expand = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.mult = nn.Conv2d(32, 64, 3, padding=1, groups=32)
        self.side = nn.Conv2d(32, 16, 1)
        self.zbn, self.mix = nn.BatchNorm2d(80), nn.Conv2d(80, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1, self.ln, self.bn1d = nn.Linear(32 * 4, 64), nn.LayerNorm(64), nn.BatchNorm1d(64)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.gn(self.grouped(x)))
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        x = x + y * s
        z = self.zbn(torch.cat([self.mult(x), self.side(x)], dim=1))
        x = self.mix(F.gelu(z)) + x
        h = torch.flatten(self.pool(x), 1)
        h = self.bn1d(F.leaky_relu(self.ln(self.fc1(h))))
        return self.fc2(self.drop(h))


def test_hand_written_model_every_tie():
    torch.manual_seed(0)
    model = randomised(Custom())
    x = torch.randn(4, 3, 8, 8)
    net = convert(model, x)
    # one residual stream (stem, grouped conv, SE scale, mix), the side branch, the hidden features
    assert set(net.space.names) == {"stem", "side", "fc1"}
    assert "se_reduce" in net.kept  # 8 channels: nothing narrower at round_to=8
    # the grouped conv and GroupNorm slice whole groups of 8 channels
    assert all(c % 8 == 0 for c in net.space["stem"].choices)
    smallest = net.space.smallest()
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), model(x)) <= 1e-5
        sub = ds.extract_subnet(net, smallest)
        assert rel_err(sub(x), net(x, smallest)) <= 1e-5
    assert sub.grouped.groups == smallest["stem"] // 8 and sub.mult.out_channels == 2 * smallest["stem"]
    assert sub.mix.in_channels == sub.zbn.num_features == 2 * smallest["stem"] + smallest["side"]
    assert sub.fc1.in_features == 4 * smallest["stem"]
    # the concatenation makes MACs a sum of monomials: counted on the extracted subnet
    assert not net.analytic_costs
    assert ds.count_macs(net, smallest) == count_module_macs(sub, (3, 8, 8))
    # training mode too: same batch statistics, same dropout mask, gradients reach every weight
    model.train(), net.train()
    torch.manual_seed(1)
    want = model(x)
    torch.manual_seed(1)
    got = net(x, net.space.largest())
    assert rel_err(got, want) <= 1e-5
    mean = net.zbn.running_mean.clone()
    net(x, smallest).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    # BatchNorm over the concatenation updates exactly the statistics of the channels it saw
    s, side = 2 * smallest["stem"], smallest["side"]
    seen = torch.zeros(80, dtype=torch.bool)
    seen[:s], seen[64 : 64 + side] = True, True
    assert torch.equal(net.zbn.running_mean != mean, seen)
    # a converted net is an ordinary module: torch.save / torch.load round-trip it
    buffer = io.BytesIO()
    torch.save(net.eval(), buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buffer, weights_only=False)(x, smallest), net(x, smallest))


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in short (timm is not a test dependency): a BatchNorm subclass whose
    own forward branches on ``self.training``, then applies ``drop`` and ``act``."""

    def __init__(self, num_features: int, act: nn.Module, drop: nn.Module | None = None):
        super().__init__(num_features)
        self.drop, self.act = drop or nn.Identity(), act

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )
        return self.act(self.drop(x))


class WithBatchNormAct(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.stem, self.bn1 = (
            nn.Conv2d(3, 32, 3, padding=1, bias=False),
            BatchNormAct(32, act(), nn.Dropout(0.2)),
        )
        self.a, self.b = nn.Conv2d(32, 16, 1), nn.Conv2d(32, 16, 3, padding=1)
        self.bn2 = BatchNormAct(32, nn.ReLU())  # over a concatenation: one set of statistics
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = self.bn2(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(x.mean((2, 3)))


def test_batchnorm_with_its_own_forward_and_an_activation_is_one_sliced_layer():
    """timm's BatchNormAct2d (39 timm networks) was traced through and refused for branching on
    ``self.training``; it is a BatchNorm whose channels pass through, then its activation."""
    torch.manual_seed(0)
    model = randomised(WithBatchNormAct())
    x = torch.randn(4, 3, 8, 8)
    net = convert(model, x, round_to=4)
    assert set(net.space.names) == {"stem", "a", "b"}
    smallest = net.space.smallest()
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), model(x)) <= 1e-5
        sub = ds.extract_subnet(net, smallest)
        assert rel_err(sub(x), net(x, smallest)) <= 1e-5
    # extracted as the model's own class, narrower, with its activation and dropout
    assert type(sub.bn1) is BatchNormAct and type(sub.bn2) is BatchNormAct
    assert sub.bn1.num_features == smallest["stem"] and sub.bn2.num_features == smallest["a"] + smallest["b"]
    assert isinstance(sub.bn1.act, nn.SiLU) and isinstance(sub.bn1.drop, nn.Dropout)
    # training mode: same batch statistics, same dropout mask, statistics updated per width
    model.train(), net.train()
    torch.manual_seed(1)
    want = model(x)
    torch.manual_seed(1)
    assert rel_err(net(x, net.space.largest()), want) <= 1e-5
    before = net.bn1.running_mean.clone()
    net(x, smallest).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    changed = (net.bn1.running_mean != before).any(dim=1)
    assert changed.tolist() == [w == smallest["stem"] for w in net.bn1.widths]


def test_engine_keeps_what_it_cannot_follow_whole_with_the_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 1), nn.Linear(16 * 36, 10)

        def forward(self, x):
            h = self.b(self.a(x))
            return self.fc(h.reshape(h.shape[0], 16 * 36))  # a size written in the code

    gm = trace(Odd().eval(), torch.randn(1, 3, 8, 8))
    groups = {g.name: g for g in analyze(gm).groups.values()}
    assert groups["a"].fixed is None
    assert "reshapes (1, 16, 6, 6) to (1, 576)" in groups["b"].fixed
    assert groups["b"].modules("producer") == ("b",) and groups["b"].modules("consumer") == ()


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and isinstance(error.value, ValueError)
    return text


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3), nn.Linear(16, 10)
        self.gate = Gate()

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class ReadsParameter(Branchy):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 16, 1, 1))

    def forward(self, x):
        return self.fc((self.conv(x) * self.scale).mean((2, 3)))


class TwoInputs(Branchy):
    def forward(self, x, y):
        return self.fc(self.conv(x + y).mean((2, 3)))


class StdConv(nn.Conv2d):
    """A weight-standardised conv (NF-ResNet's): the weight it convolves with is computed."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias)


class ReturnsTuple(Branchy):
    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc(h), h


class ModeDependent(Branchy):
    def forward(self, x):
        return self.fc(F.dropout(self.conv(x), 0.1, self.training).mean((2, 3)))


class Plain(Branchy):
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "x", "kwargs", "expected"),
    [
        (Branchy(), torch.randn(1, 3, 8, 8), {}, "in gate (Gate), test_make_supernet.py:"),
        (
            Plain(),
            torch.randn(1, 1, 8, 8),
            {},
            "example input of shape (1, 1, 8, 8) does not run through Plain",
        ),
        (Plain(), [1, 2], {}, "example_input must be a tensor"),
        (
            TwoInputs(),
            torch.randn(1, 3, 8, 8),
            {},
            "TwoInputs.forward takes 2 inputs without defaults (x, y)",
        ),
        (ReturnsTuple(), torch.randn(1, 3, 8, 8), {}, "must return one tensor of class scores"),
        (ModeDependent(), torch.randn(1, 3, 8, 8), {}, "runs different code in training and in eval mode"),
        (
            WithBatchNormAct(act=Gate),
            torch.randn(1, 3, 8, 8),
            {},
            "bn1 (BatchNormAct) is a BatchNorm with its own forward, but its act (Gate) is not a pointwise",
        ),
        (
            nn.Sequential(nn.Linear(8, 10)),
            torch.randn(1, 8),
            {},
            "found no channels of Sequential it can slice",
        ),
        (
            nn.Sequential(StdConv(3, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)),
            torch.randn(1, 3, 8, 8),
            {},
            "it can slice (3: the model's output; the first op it cannot follow: mean (mean) in 0 makes",
        ),
        (Plain(), torch.randn(1, 3, 8, 8), {"round_to": 0}, "round_to must be a positive integer"),
        (Plain(), torch.randn(1, 3, 8, 8), {"ratios": [0.0, 1.0]}, "width ratios must lie in (0, 1]"),
        (Plain(), torch.randn(1, 3, 8, 8), {"ratios": [1.5]}, "width ratios must lie in (0, 1]"),
    ],
)
def test_refusals_are_one_line(model, x, kwargs, expected):
    with pytest.raises(ValueError) as error:
        ds.make_supernet(model, x, **kwargs)
    assert expected in one_line(error)


def test_untraceable_model_names_the_line():
    with pytest.raises(GraphError) as error:
        ds.make_supernet(Branchy(), torch.randn(1, 3, 8, 8))
    assert "`if x.sum() > 0:  # data-dependent control flow`" in one_line(error)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16)
        self.reduce, self.expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = x * F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.fc(x.mean((2, 3)))


def test_pruning_reads_the_same_engine_an_se_gate_is_tied_to_what_it_scales():
    """Pruning's groups come from the engine: an SE scale (once refused by pruning's own table,
    which did not know ``mul``) is tied to the channels it scales, and the pruned model keeps the
    function when the removed channels carry nothing."""
    from dynaslice.prune.common import PruningError, model_channel_groups, prune_channels

    torch.manual_seed(0)
    model = randomised(SqueezeExcite())
    gm, groups = model_channel_groups(model, (1, 8, 8))
    assert groups["conv"].producers == ("conv", "expand") and groups["conv"].norms == ("bn",)
    assert groups["conv"].consumers == ("reduce", "fc") and not groups["conv"].internal
    with torch.no_grad():
        gm.bn.weight[:4], gm.bn.bias[:4] = 0.0, -10.0  # relu(-10) = 0: four dead channels
    pruned = prune_channels(gm, groups, {"conv": list(range(4, 16))})
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert rel_err(pruned(x), gm(x)) <= 1e-5
    with pytest.raises(
        PruningError, match="does not support the grouped conv grouped"
    ):  # engine: yes; surgery: no
        model_channel_groups(Custom(), (3, 8, 8))


def test_channels_of_a_converted_net_are_ordered_by_importance(converted):
    """The zoo's reordering runs on converted nets (the engine knows their layers): every sliced
    group is sorted, the largest subnet keeps its function, and what a permutation cannot follow
    is refused in one line."""
    from dynaslice.ordering import OrderingError, reorder_channels

    torch.manual_seed(0)
    model = randomised(torchvision.models.resnet18(num_classes=10)).double()
    x = torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64)
    net = convert(model, x)
    with torch.no_grad():
        before = net(x, net.space.largest())
    perms = reorder_channels(net)
    assert sorted(g.dim for g, _ in perms) == sorted(net.space.names)
    assert all((p != torch.arange(len(p))).any() for _, p in perms)  # random weights are not sorted
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), before) <= 1e-10
        assert rel_err(model(x), before) <= 1e-10  # the model itself was not touched
    for name, why in [("regnet_x_400mf", "grouped conv"), ("squeezenet1_0", "concatenates")]:
        with pytest.raises(OrderingError, match=why) as error:
            reorder_channels(converted(name)[1])
        one_line(error)


class ChannelsLast(nn.Module):
    """ConvNeXt's block without its layer scale (a depthwise conv, then LayerNorm and an MLP on
    channels-last features, permuted back into a residual), spatial indexing, a softmax over
    space, and a branch whose code reads its channel count."""

    def __init__(self):
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, 32, 2, stride=2), nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.norm, self.up, self.down = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(64, 32)
        self.side, self.head = nn.Conv2d(32, 16, 1), nn.Linear(48, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.down(F.gelu(self.up(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        x = (x + y.transpose(1, 3))[:, :, 1:]
        x = x * torch.softmax(x, dim=-1)
        s = self.side(x)
        s = s * (1.0 / s.size(1))  # a width written into the arithmetic: keep it whole
        return self.head(torch.cat([x, s], 1).mean((2, 3)))


def test_channels_last_layers_follow_their_axis():
    torch.manual_seed(0)
    model = randomised(ChannelsLast())
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="side .*reads the channel count"):
        net = ds.make_supernet(model, x)
    assert set(net.space.names) == {"stem", "up"}
    smallest = net.space.smallest()
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), model(x)) <= 1e-5
        sub = ds.extract_subnet(net, smallest)
        assert rel_err(sub(x), net(x, smallest)) <= 1e-5
    assert sub.norm.normalized_shape == (smallest["stem"],) and sub.up.out_features == smallest["up"]
    assert sub.side.out_channels == 16 and sub.head.in_features == smallest["stem"] + 16


# --- parameters read outside layers (issue 28) ------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """torchvision's / timm's LayerNorm over the channels of an NCHW map: its own forward permutes."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class OwnLinear(nn.Linear):
    """timm's Linear: a Linear subclass whose own forward calls F.linear on its parameters."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class GroupNorm1(nn.GroupNorm):
    """timm's GroupNorm1 (PoolFormer): a GroupNorm subclass reading its weights in F.group_norm."""

    def __init__(self, channels):
        super().__init__(1, channels)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class LayerScaleNet(nn.Module):
    """ConvNeXt-like: LayerNorm2d stem, a block whose branch is scaled by a [C,1,1] layer scale and
    a [C] one (channels-last), GroupNorm1, a Linear subclass head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), LayerNorm2d(64))
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.pw = nn.Linear(64, 64)
        self.gamma = nn.Parameter(torch.rand(64) + 0.5)  # channels-last layer scale [C]
        self.conv = nn.Conv2d(64, 64, 1)
        self.layer_scale = nn.Parameter(torch.rand(64, 1, 1) + 0.5)  # torchvision CNBlock's [C,1,1]
        self.scale4d = nn.Parameter(torch.rand(64) + 0.5)  # timm's gamma.reshape(1, -1, 1, 1)
        self.norm = GroupNorm1(64)
        self.head = OwnLinear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.pw(self.dw(x).permute(0, 2, 3, 1)) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        x = x + self.layer_scale * self.conv(x)
        x = x + F.relu(x) * self.scale4d.reshape(1, -1, 1, 1)
        return self.head(self.norm(x).mean((2, 3)))


class TokenNet(nn.Module):
    """ViT-like: a patch conv, class token [1,1,D] concatenated on the token axis (expanded to the
    batch), position embedding [1,T,D] added, LayerNorm, an MLP, the class token's features."""

    def __init__(self, dim=32, tokens=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.ln = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 48), nn.Linear(48, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x, mask=None, scale: float = 1.0):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.encoder.pos_embedding
        if mask is not None:
            x = x * mask
        x = x + self.fc2(F.gelu(self.fc1(self.ln(x)))) * scale
        return self.head(x[:, 0])


class ReadsParameterTwice(nn.Module):
    """A layer scale also read by an op the walk cannot follow (its sum): it stays whole."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 64, 3), nn.Linear(64, 10)
        self.conv2 = nn.Conv2d(64, 64, 1)
        self.scale = nn.Parameter(torch.rand(64, 1, 1) + 0.5)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = self.conv2(h) * self.scale + self.scale.sum()
        return self.fc(h.mean((2, 3)))


def _randomised_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm | nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def _check_exact(
    model: nn.Module, net: ds.ConvertedSupernet, x: torch.Tensor, tmp_path=None
) -> fx.GraphModule:
    """largest == model; the extracted narrowest == its slice, plain torch, its MACs and
    parameters those count_macs / count_params give; ONNX == torch when ``tmp_path`` is given."""
    smallest = net.space.smallest()
    with torch.no_grad():
        assert rel_err(net(x, net.space.largest()), model(x)) <= 1e-5
        sliced = net(x, smallest)
        sub = ds.extract_subnet(net, smallest)
        assert rel_err(sub(x), sliced) <= 1e-5
    assert all(type(m).__module__.startswith(("torch.", "torchvision.")) for m in sub.modules())
    assert ds.count_macs(net, smallest) == count_module_macs(sub, tuple(x.shape[1:]))
    assert ds.count_params(net, smallest) == sum(p.numel() for p in sub.parameters())
    if tmp_path is not None:
        ort = pytest.importorskip("onnxruntime")
        from dynaslice.onnx_export import export_onnx

        path = export_onnx(net, smallest, tmp_path / "net.onnx")
        got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
        assert rel_err(torch.from_numpy(got), sliced) <= 1e-4
    return sub


def test_layer_scales_functional_norms_and_a_linear_subclass_are_sliced_with_their_channels(tmp_path):
    """Parameters read outside layers (layer scales [C], [C,1,1] and reshaped to [1,C,1,1]), the
    weights of a LayerNorm2d / GroupNorm1 / Linear subclass read by F.layer_norm / F.group_norm /
    F.linear: each joins the channel group it meets, and the subnet's parameter has its width."""
    torch.manual_seed(0)
    model = _randomised_norms(LayerScaleNet())
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing kept whole but the classes
        net = ds.make_supernet(model, x)
    assert net.space.names == ("stem.0",) and net.kept == {"head": "the model's output"}
    sub = _check_exact(model, net, x, tmp_path)
    w = net.space.smallest()["stem.0"]
    shapes = {k: tuple(v.shape) for k, v in sub.state_dict().items()}
    assert shapes["gamma"] == (w,) and shapes["layer_scale"] == (w, 1, 1) and shapes["scale4d"] == (w,)
    assert shapes["stem.1.weight"] == shapes["norm.bias"] == (w,) and shapes["head.weight"] == (10, w)
    assert net.gamma.shape == (64,)  # the supernet keeps the model's parameters, under their names
    assert set(net.state_dict()) == set(model.state_dict())


def test_class_token_position_embedding_and_defaulted_inputs(tmp_path):
    """A class token [1,1,D] concatenated on the token axis (expanded to the batch), a position
    embedding [1,T,D] added, a LayerNorm, an MLP; forward's extra inputs traced at their defaults."""
    torch.manual_seed(0)
    model = _randomised_norms(TokenNet())
    x = torch.randn(2, 3, 16, 16)
    net = convert(model, x)
    assert set(net.space.names) == {"patch", "fc1"}
    sub = _check_exact(model, net, x, tmp_path)
    d = net.space.smallest()["patch"]
    assert sub.class_token.shape == (1, 1, d) and sub.encoder.pos_embedding.shape == (1, 17, d)
    assert net.class_token.shape == (1, 1, 32)


def test_a_parameter_read_where_the_walk_cannot_follow_keeps_its_channels_whole():
    torch.manual_seed(0)
    model = ReadsParameterTwice().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"conv2 \(parameter scale is read by sum "):
        net = ds.make_supernet(model, x)
    assert net.space.names == ("conv",)
    _check_exact(model, net, x)
    # pruning (analyze without parameters) keeps every group a parameter meets whole, as before
    groups = {g.name: g for g in analyze(trace(model, x)).groups.values()}
    assert "cannot place" in groups["conv2"].fixed


def test_torchvision_convnext_and_vit_convert_exactly():
    """torchvision's own ConvNeXt (LayerNorm2d, CNBlock's layer scale) and ViT (class token,
    position embedding, MLP widths, attention heads and its hidden size, which a reshape writes),
    built tiny from their classes (heads: tests/test_converted_heads.py)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    convnext = randomised(ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    net = convert(_randomised_norms(convnext), x)
    assert len(net.space.dims) == 5 and set(net.kept) == {"classifier.2"}  # 2 streams, 3 MLPs
    _check_exact(convnext, net, x)

    vit = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    with torch.no_grad():
        vit.heads.head.weight.normal_()  # torchvision starts the head at zero
    vit = _randomised_norms(vit)
    net = convert(vit, x)
    assert set(net.space.names) == {"conv_proj"} | {
        f"encoder.layers.encoder_layer_{i}.{d}" for i in (0, 1) for d in ("mlp.0", "self_attention.heads")
    }
    _check_exact(vit, net, x)


def test_channels_of_a_net_reading_parameters_outside_layers_are_ordered():
    """Ordering follows the parameters too: a layer scale and a class token are permuted with their
    channels, so the largest subnet is still the model and the narrowest extracts exactly."""
    from dynaslice.ordering import reorder_channels

    for model in (_randomised_norms(LayerScaleNet()), _randomised_norms(TokenNet())):
        x = torch.randn(2, 3, 16, 16)
        net = convert(model, x)
        reorder_channels(net)
        _check_exact(model, net, x)
        moved = net.gamma if hasattr(net, "gamma") else net.class_token
        kept = model.gamma if hasattr(model, "gamma") else model.class_token
        assert not torch.equal(moved, kept) and torch.equal(
            moved.flatten().sort()[0], kept.flatten().sort()[0]
        )
