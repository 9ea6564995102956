"""The dynamic gate: cost, routing space, Stage-I forward, Gumbel straight-through and the SGS loss."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dynaslice as ds
from dynaslice.gate import (
    DynamicGate,
    GatedSupernet,
    anneal_tau,
    calibrate_route_bias,
    gate_loss,
    gumbel_routes,
    resolve_target_macs,
    routes_even,
    sgs_targets,
    validate_routes,
)


@pytest.fixture(scope="module")
def net():
    """One small ResNet supernet per module: its MAC model (a few seconds to build) is cached on it."""
    torch.manual_seed(0)
    return ds.create_supernet("resnet_small", input_size=16).eval()


# --------------------------------------------------------------------------- the gate module


def test_gate_macs_match_torch_counter_and_are_tiny(net):
    gated = GatedSupernet(net, routes=4)
    gate = gated.gate
    with FlopCounterMode(display=False) as counter:
        gate(torch.randn(2, gate.channels, 8, 8))
    assert counter.get_total_flops() // 2 == 2 * gate.macs()  # per image, batch of 2
    narrowest = ds.count_macs(net, gated.routes[0])
    assert gate.macs() < 0.001 * narrowest


def test_gate_heads_are_se_and_logits():
    torch.manual_seed(0)
    gate = DynamicGate(12, routes=3, reduction=4)
    x = torch.randn(2, 12, 5, 5)
    scaled, logits = gate(x)
    z = F.relu(gate.reduce(x.mean((2, 3), keepdim=True)))
    assert torch.allclose(scaled, x * torch.sigmoid(gate.attention(z)))
    assert torch.allclose(logits, gate.slimming(z).flatten(1))
    assert logits.shape == (2, 3) and gate.hidden == 3
    assert torch.equal(gate.attend(x), scaled)


def test_token_gate_reads_the_class_token():
    torch.manual_seed(0)
    gate = DynamicGate(8, routes=2, tokens=True)
    x = torch.randn(3, 5, 8)
    scaled, logits = gate(x)
    y = x.clone()
    y[:, 1:] = torch.randn(3, 4, 8)  # other tokens do not change the decision or the scale
    scaled_y, logits_y = gate(y)
    assert torch.equal(logits, logits_y)
    assert torch.allclose(scaled / x, scaled_y / y)
    assert scaled.shape == x.shape


def test_gate_needs_two_routes():
    with pytest.raises(ValueError, match="at least 2 routes"):
        DynamicGate(8, routes=1)


# --------------------------------------------------------------------------- routes


def test_routes_even_fix_pre_gate_dims_and_spread_macs(net):
    cut = 2
    routes = routes_even(net, 4, cut)
    before = net.dims_before(cut)
    assert before == ("s1", "s2")
    largest = net.space.largest()
    assert all(r[d] == largest[d] for r in routes for d in before)  # default: widest trunk
    assert routes[-1] == largest
    macs = [int(m) for m in ds.count_macs(net, routes)]
    assert macs == sorted(set(macs))
    steps = [b - a for a, b in zip(macs, macs[1:], strict=False)]
    assert max(steps) < 2 * min(steps)  # roughly even on this grid
    assert validate_routes(net, routes, cut) == routes


def test_routes_even_pre_gate_is_configurable(net):
    routes = routes_even(net, 3, 2, pre_gate={"s1": 8})
    assert {r["s1"] for r in routes} == {8}
    assert {r["s2"] for r in routes} == {net.space["s2"].max}
    with pytest.raises(ValueError, match="not before the gate"):
        routes_even(net, 3, 2, pre_gate={"s4": 8})
    with pytest.raises(ValueError, match="distinct uniform-width routes"):
        routes_even(net, 1000, 2)


def test_validate_routes_explains_bad_lists(net):
    a, b = net.space.uniform(0.5), net.space.largest()
    with pytest.raises(ValueError, match="before the gate"):
        validate_routes(net, [a, b], 2)  # s1/s2 differ
    small = b.replace(s3=net.space["s3"].min, s4=net.space["s4"].min)
    with pytest.raises(ValueError, match="sorted by MACs"):
        validate_routes(net, [b, small], 2)
    with pytest.raises(ValueError, match="sorted by MACs"):
        validate_routes(net, [small, small, b], 2)
    with pytest.raises(ValueError, match="outside 0..3"):
        validate_routes(net, [small, b], 4)


def test_default_cut_is_a_family_attribute(net):
    assert net.default_gate_cut() == net.n_stages // 2  # after the middle stage
    dsmbnet = ds.create_supernet("dsmbnet_small")
    sliced = [i for i in range(dsmbnet.n_stages) if any(len(dsmbnet.space[d].choices) > 1 for d in dsmbnet.stage_dims(i))]
    first_sliced = sliced[0]
    assert dsmbnet.default_gate_cut() == first_sliced > 0
    assert GatedSupernet(net, routes=2).cut == net.default_gate_cut()


# --------------------------------------------------------------------------- Stage I


def test_stage1_forward_is_backbone_plus_attention(net):
    gated = GatedSupernet(net, routes=3)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    arch = gated.routes[1].replace(s4=net.space["s4"].choices[3])  # any arch of the pinned space
    with torch.no_grad():
        want = net.forward_from(gated.gate.attend(net.forward_to(x, arch, gated.cut)), arch, gated.cut)
        assert torch.equal(gated(x, arch), want)
        # trunk + route = the Stage-I forward of that route
        h, logits = gated.trunk(x)
        assert torch.equal(gated.forward_route(h, 1), gated(x, gated.routes[1]))
    assert logits.shape == (2, 3)


def test_gated_space_pins_pre_gate_dims(net):
    gated = GatedSupernet(net, routes=3)
    assert gated.space["s1"].choices == (net.space["s1"].max,)
    assert gated.space["s3"].choices == net.space["s3"].choices
    with pytest.raises(ValueError, match="s1=8 is not allowed"):
        gated(torch.randn(1, 3, 16, 16), net.space.largest().replace(s1=8))
    # Stage-I MACs of the gated supernet: the backbone's plus the attention head's convs
    arch = gated.routes[0]
    g = gated.gate
    assert ds.count_macs(gated, arch) == ds.count_macs(net, arch) + 2 * g.channels * g.hidden
    # Stage-I training never touches the slimming head (no unused parameters for DDP)
    gated.train()
    gated(torch.randn(2, 3, 16, 16), arch).sum().backward()
    assert gated.gate.slimming.weight.grad is None and gated.gate.attention.weight.grad is not None
    net.eval()


def test_gated_route_extracts_to_a_static_model(net):
    """A route of a gated supernet exports like any subnet (the attention head included)."""
    gated = GatedSupernet(net, routes=2)
    assert not gated.training  # the wrapper takes the wrapped net's mode
    static = ds.extract_subnet(gated, gated.routes[0])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(static(x), gated(x, gated.routes[0]), atol=1e-6)


def test_explicit_routes_and_pre_gate_conflict(net):
    routes = routes_even(net, 2, 1)
    gated = GatedSupernet(net, cut=1, routes=routes)
    assert gated.routes == tuple(routes) and gated.gate.channels == net.space["s1"].max
    with pytest.raises(ValueError, match="pre_gate"):
        GatedSupernet(net, cut=1, routes=routes, pre_gate={"s1": 8})


# --------------------------------------------------------------------------- Gumbel straight-through


def test_gumbel_is_one_hot_and_trains_the_slimming_head(net):
    gated = GatedSupernet(net, routes=4)
    params = gated.freeze_for_stage2()
    assert params == list(gated.gate.slimming.parameters())
    assert not any(p.requires_grad for n, p in gated.named_parameters() if not n.startswith("gate.slimming"))
    assert not gated.training
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    h, logits = gated.trunk(x)
    weights = gumbel_routes(logits, tau=1.0)
    assert torch.equal(weights.sum(1), torch.ones(8)) and set(weights.unique().tolist()) <= {0.0, 1.0}
    out = gated.forward_mixed(h, weights)
    with torch.no_grad():  # forward value: each sample's own route
        want = torch.cat([gated.forward_route(h[i : i + 1], int(weights[i].argmax())) for i in range(8)])
    assert torch.allclose(out, want, atol=1e-6)
    F.cross_entropy(out, y).backward()
    assert gated.gate.slimming.weight.grad.abs().sum() > 0
    assert gated.gate.reduce.weight.grad is None


def test_anneal_tau():
    assert anneal_tau(0, 100) == pytest.approx(1.0)
    assert anneal_tau(100, 100) == pytest.approx(0.1)
    assert anneal_tau(50, 100) == pytest.approx(0.1**0.5)
    assert anneal_tau(500, 100) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        gumbel_routes(torch.zeros(1, 2), tau=0.0)


# --------------------------------------------------------------------------- SGS


def test_sgs_targets_easy_hard_hopeless():
    labels = torch.tensor([0, 1, 2, 0])
    # sample 0: smallest right (easy); 1: smallest wrong, largest right (hard);
    # 2: both wrong (hopeless); 3: smallest right although largest wrong (easy)
    smallest = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0]])
    largest = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 5.0, 0]])
    assert sgs_targets(smallest, largest, labels, 4).tolist() == [0, 3, 3, 0]
    assert sgs_targets(smallest, largest, labels, 4, drop_hopeless=True).tolist() == [0, 3, -100, 0]
    with pytest.raises(ValueError, match="integer class labels"):
        sgs_targets(smallest, largest, labels.float(), 4)


def _loss_parts(weights, logits, target_macs, targets=None):
    route_macs = torch.tensor([100.0, 200.0, 300.0, 400.0], dtype=torch.float64)
    outputs = torch.randn(weights.shape[0], 5)
    labels = torch.zeros(weights.shape[0], dtype=torch.long)
    targets = torch.zeros(weights.shape[0], dtype=torch.long) if targets is None else targets
    return gate_loss(logits, targets, outputs, labels, weights, route_macs, target_macs)


def test_gate_ce_is_one_softmax_on_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    parts = _loss_parts(torch.softmax(logits, 1), logits, None, targets=torch.tensor([2]))
    assert parts.gate_ce.item() == pytest.approx(-torch.log_softmax(logits, 1)[0, 2].item())
    assert parts.complexity.item() == 0.0
    ignored = _loss_parts(torch.softmax(logits, 1), logits, None, targets=torch.tensor([-100]))
    assert ignored.gate_ce.item() == 0.0
    assert set(parts.log()) == {"total", "gate_ce", "task_ce", "complexity", "expected_macs"}


@pytest.mark.parametrize("target, sign", [(0.25, 1.0), (1.0, -1.0)])
def test_complexity_pulls_toward_the_target(target, sign):
    """Above the target, the penalty lowers the widest route's logit; below it, raises it."""
    logits = torch.zeros(4, 4, requires_grad=True)  # uniform: E[MACs] = 250 of 400
    weights = torch.softmax(logits, 1)
    parts = _loss_parts(weights, logits, target)
    parts.complexity.backward()
    grad_widest = logits.grad[:, 3]
    assert torch.all(torch.sign(grad_widest) == sign)  # gradient descent moves against it
    assert parts.expected_macs.item() == pytest.approx(250.0)
    # absolute target: the same as the fraction
    assert resolve_target_macs(100.0, torch.tensor([100.0, 400.0])) == 100.0
    assert resolve_target_macs(0.5, torch.tensor([100.0, 400.0])) == 200.0
    with pytest.raises(ValueError, match="cannot be reached"):
        resolve_target_macs(0.1, torch.tensor([100.0, 400.0]))


# --------------------------------------------------------------------------- route bias calibration


def test_calibrated_bias_meets_the_budget_and_keeps_the_gates_ranking():
    torch.manual_seed(0)
    macs = torch.tensor([10.0, 14.0, 20.0, 30.0], dtype=torch.float64)
    # a gate that sends every sample to the narrowest route by raw argmax, but ranks them
    logits = torch.randn(1000, 4) * 0.3
    logits[:, 0] += 3.0
    assert float(macs[logits.argmax(1)].mean()) == 10.0
    spent = []
    for target in (12.0, 16.0, 20.0, 25.0):
        bias = calibrate_route_bias(logits, macs, target)
        routes = (logits + bias).argmax(1)
        spent.append(float(macs[routes].mean()))
        assert spent[-1] <= target
        assert spent[-1] > target - 1.0  # tight: at most a few images' worth below the budget
    assert spent == sorted(spent)
    # two routes: the images sent wide are exactly the k the gate rates hardest (raw l1 - l0)
    two = logits[:, :2]
    routes = (two + calibrate_route_bias(two, macs[:2], 12.0)).argmax(1)
    k = int(routes.sum())
    assert 0 < k < len(two)
    hardest = (two[:, 1] - two[:, 0]).topk(k).indices
    assert set(hardest.tolist()) == set(routes.nonzero().squeeze(1).tolist())
    assert bool((calibrate_route_bias(logits, macs, 100.0) + logits).argmax(1).eq(3).all())
    assert bool((calibrate_route_bias(logits, macs, 1.0) + logits).argmax(1).eq(0).all())
    with pytest.raises(ValueError, match="logits"):
        calibrate_route_bias(logits[:, :3], macs, 20.0)
