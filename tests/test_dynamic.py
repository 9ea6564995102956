"""Dynamic inference: deterministic routing, route-grouped batches equal per-sample runs, MAC accounting."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynaslice as ds
from dynaslice.dynamic import DynamicNet
from dynaslice.gate import GatedSupernet
from dynaslice.nn import SlicedBatchNorm2d, SlicedLinear
from dynaslice.space import Arch, Dim, SearchSpace


class TokenNet(ds.Supernet):
    """A toy transformer-shaped supernet: stages map tokens [B, N, C] to tokens, class token first.

    Stands in for a ViT (whose family lands separately) to show the gate works on any family
    that keeps the Supernet contract.
    """

    def __init__(self, embed: int = 16, patch: int = 4, size: int = 8, classes: int = 5):
        super().__init__()
        self.input_size, self.num_classes, self.n_stages = (3, size, size), classes, 3
        self.patch = patch
        self.space = SearchSpace(tuple(Dim(f"h{i}", (8, 16, 24, 32)) for i in range(3)))
        self.embed = nn.Linear(3 * patch * patch, embed)
        self.cls = nn.Linear(1, embed, bias=False)  # the class token, as a leaf parameter
        self.fc1 = nn.ModuleList(SlicedLinear(embed, 32) for _ in range(3))
        self.fc2 = nn.ModuleList(SlicedLinear(32, embed) for _ in range(3))
        self.head = nn.Linear(embed, classes)

    def stage_dims(self, i: int) -> tuple[str, ...]:
        return (f"h{i}",) if 0 <= i < self.n_stages else ()

    def forward_stem(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        p = nn.functional.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # [B, N, 3*p*p]
        tokens = self.embed(p)
        cls = self.cls(x.new_ones(x.shape[0], 1, 1)) + tokens.mean(1, keepdim=True)
        return torch.cat([cls, tokens], 1)

    def forward_stage(self, i: int, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return x + self.fc2[i](torch.relu(self.fc1[i](x, arch[f"h{i}"])))

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self.head(x[:, 0])


def randomize_bn_stats(net: nn.Module, seed: int = 0) -> None:
    """Distinct running statistics per width, so that a wrong width's stats would show."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, SlicedBatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


@torch.no_grad()
def spread_routes(gated: GatedSupernet, x: torch.Tensor, skip: tuple[int, ...] = (), seed: int = 0) -> None:
    """Set the slimming head so that the samples of ``x`` spread over the routes.

    Logit ``r`` is ``r * s - (t_1 + ... + t_r)`` for one projection ``s`` of the gate's hidden
    features and thresholds ``t`` halfway between samples at quantiles of ``s`` (no ties to
    break by rounding): the argmax is the number of thresholds below ``s``. Routes in ``skip``
    get a hopeless bias (empty groups).
    """
    gate = gated.gate
    z = gate.squeeze(gated.net.forward_to(x, gated.routes[0], gated.cut)).flatten(1)
    u = torch.randn(z.shape[1], generator=torch.Generator().manual_seed(seed))
    s = (z @ u).sort().values
    k, n = len(gated.routes), x.shape[0]
    cuts = [round(j * n / k) for j in range(1, k)]
    t = torch.stack([(s[i - 1] + s[i]) / 2 for i in cuts])
    bias = torch.cat([torch.zeros(1), -torch.cumsum(t, 0)])
    bias[list(skip)] = -1e4
    gate.slimming.weight.copy_((torch.arange(k, dtype=torch.float32)[:, None] * u)[:, :, None, None])
    gate.slimming.bias.copy_(bias)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    net = ds.create_supernet("resnet_small", input_size=16).eval()
    randomize_bn_stats(net)
    return net


def per_sample(dyn: DynamicNet, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([dyn(x[i : i + 1]) for i in range(x.shape[0])])


def test_batched_equals_per_sample_with_a_route_mix(net):
    gated = GatedSupernet(net, routes=4)
    dyn = DynamicNet(gated)
    torch.manual_seed(0)
    x = torch.randn(12, 3, 16, 16)
    spread_routes(gated, x, skip=(1,))  # route 1 stays empty
    with torch.no_grad():
        out, routes = dyn.forward_with_routes(x)
        alone = per_sample(dyn, x)
    counts = dyn.route_counts(routes)
    assert counts[1] == 0 and sum(c > 0 for c in counts) == 3 and sum(counts) == 12
    assert (out - alone).abs().max() <= 1e-5
    # each sample really ran its own route (not, say, the widest with masks)
    with torch.no_grad():
        for i in range(12):
            h, _ = gated.trunk(x[i : i + 1])
            assert torch.allclose(out[i : i + 1], gated.forward_route(h, int(routes[i])), atol=1e-5)


def test_order_is_preserved_under_permutation(net):
    gated = GatedSupernet(net, routes=3)
    dyn = DynamicNet(gated)
    torch.manual_seed(2)
    x = torch.randn(9, 3, 16, 16)
    spread_routes(gated, x)
    perm = torch.randperm(9)
    with torch.no_grad():
        out, routes = dyn.forward_with_routes(x)
        out_p, routes_p = dyn.forward_with_routes(x[perm])
    assert torch.equal(routes_p, routes[perm])
    assert (out_p - out[perm]).abs().max() <= 1e-5


def test_batch_of_one_and_forced_routes(net):
    gated = GatedSupernet(net, routes=4)
    dyn = DynamicNet(gated)
    torch.manual_seed(3)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        out, route = dyn.forward_with_routes(x)
        assert route.shape == (1,) and out.shape == (1, 10)
        h, logits = gated.trunk(x)
        assert torch.equal(out, gated.forward_route(h, int(logits.argmax())))
        # a forced mix (as the benchmark does) also equals per-sample runs
        xb = torch.randn(6, 3, 16, 16)
        forced = torch.tensor([0, 3, 3, 0, 0, 3])
        out_b, used = dyn.forward_with_routes(xb, forced)
        assert torch.equal(used, forced)
        hb, _ = gated.trunk(xb)
        want = torch.cat([gated.forward_route(hb[i : i + 1], int(forced[i])) for i in range(6)])
        assert (out_b - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="outside 0..3"):
        dyn.forward_with_routes(xb, torch.tensor([0, 4, 0, 0, 0, 0]))


def test_eval_routing_is_deterministic(net):
    gated = GatedSupernet(net, routes=4)
    dyn = DynamicNet(gated)
    torch.manual_seed(4)
    x = torch.randn(16, 3, 16, 16)
    spread_routes(gated, x)
    with torch.no_grad():
        first = dyn.route(x)
        torch.manual_seed(123)  # no RNG anywhere in evaluation
        second = dyn.route(x)
        _, logits = gated.trunk(x)
    assert torch.equal(first, second) and torch.equal(first, logits.argmax(1))
    assert len(first.unique()) > 1


def test_inference_keeps_bn_in_eval_mode(net):
    gated = GatedSupernet(net, routes=2)
    dyn = DynamicNet(gated)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    with torch.no_grad():
        dyn(torch.randn(4, 3, 16, 16))
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with pytest.raises(RuntimeError, match="inference-only"):
        dyn.train()
    gated.train()
    with pytest.raises(RuntimeError, match="train mode"):
        dyn(torch.randn(1, 3, 16, 16))
    dyn.eval()
    assert not net.training


def test_avg_macs_is_what_the_forward_costs(net):
    """Torch's FLOP counter on the real batched forward = avg_macs: narrow groups run narrow."""
    gated = GatedSupernet(net, routes=4)
    dyn = DynamicNet(gated)
    torch.manual_seed(5)
    x = torch.randn(10, 3, 16, 16)
    spread_routes(gated, x, skip=(2,))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _, routes = dyn.forward_with_routes(x)
    assert counter.get_total_flops() // 2 == pytest.approx(10 * dyn.avg_macs(routes), abs=0.5)
    route_macs = gated.route_macs()
    assert dyn.avg_macs(torch.tensor([0, 3])) == pytest.approx(float(route_macs[[0, 3]].mean()))
    assert route_macs[0] < route_macs[-1]


def test_token_family_batched_equals_per_sample():
    torch.manual_seed(6)
    net = TokenNet().eval()
    gated = GatedSupernet(net, cut=1, routes=3)
    assert gated.gate.tokens and gated.gate.channels == 16
    assert all(r["h0"] == 32 for r in gated.routes)  # before the gate: fixed, widest
    dyn = DynamicNet(gated)
    x = torch.randn(10, 3, 8, 8)
    spread_routes(gated, x)
    with torch.no_grad():
        out, routes = dyn.forward_with_routes(x)
        alone = per_sample(dyn, x)
    assert len(routes.unique()) > 1
    assert (out - alone).abs().max() <= 1e-5
