"""MobileNetV1/V2 and DS-MBNet supernets: subnets equal their extracted models, slicing is exact,
MAC counts match torch's counter and the published figures, torchvision weights load."""

from __future__ import annotations

import random

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynaslice as ds
from dynaslice.models.mobilenet import MBV2_SETTINGS, DSMobileNetV2
from dynaslice.nn import SlicedBatchNorm2d, SlicedConv2d, SlicedLinear
from dynaslice.space import make_divisible


def randomize(net: nn.Module, seed: int = 0) -> None:
    """Fan-in initialised weights and non-trivial BN affine parameters (O(1) logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, SlicedConv2d | SlicedLinear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            if isinstance(m, SlicedBatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def calibrate(net: ds.Supernet, arch, x: torch.Tensor) -> None:
    """Running statistics of ``arch``'s widths := the batch statistics of ``x``.

    With untrained weights and made-up statistics, eval-mode BN lets the signal fade (SE gates
    and Swish halve it block after block) until the logits are a constant made of BN biases, and
    a wrong weight slice could go unnoticed. Calibrated BN keeps every layer's output O(1).
    """
    bns = [m for m in net.modules() if isinstance(m, SlicedBatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    net.train()
    with torch.no_grad():
        net(x, arch)
    net.eval()
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum


def images(n: int, size: tuple[int, int, int]) -> torch.Tensor:
    """Smooth random images plus noise: unlike white noise, their differences survive pooling."""
    low = torch.nn.functional.interpolate(torch.randn(n, size[0], 4, 4), size=size[1:], mode="bilinear")
    return low + 0.3 * torch.randn(n, *size)


def assert_plain_torch(model: nn.Module) -> None:
    leaked = [n for n, m in model.named_modules() if type(m).__module__.startswith("dynaslice")]
    assert not leaked, f"dynaslice modules left in the extracted model: {leaked}"


def check_extraction(net: ds.Supernet, archs, size: tuple[int, int, int]) -> None:
    x = images(2, size)
    for arch in archs:
        calibrate(net, arch, images(8, size))
        sub = ds.extract_subnet(net, arch, input_size=size)
        assert_plain_torch(sub)
        with torch.no_grad():
            want, got = net(x, arch), sub(x)
        assert (want[0] - want[1]).abs().max() > 1e-2, "the test net's output ignores its input"
        diff = (want - got).abs().max().item()
        assert diff <= 1e-5, f"{arch}: supernet and extracted subnet differ by {diff}"


# (builder, kwargs, input size, random archs): 20 per family; the other input shape gets the
# largest and smallest subnets only (extraction costs ~0.3 s per arch on a busy 2-core machine)
SMALL = [
    ("mobilenet_v1_small", {"in_chans": 1}, (1, 28, 28), 20),
    ("mobilenet_v1_small", {}, (3, 32, 32), 0),
    ("mobilenet_v2_small", {"kernel_sizes": (3, 5, 7)}, (3, 32, 32), 20),
    ("mobilenet_v2_small", {"in_chans": 1}, (1, 28, 28), 0),
    ("dsmbnet_small", {"in_chans": 1}, (1, 28, 28), 20),
    ("dsmbnet_small", {}, (3, 32, 32), 0),
]


@pytest.mark.parametrize("name,kwargs,size,n", SMALL)
def test_small_subnets_equal_extracted(name, kwargs, size, n):
    torch.manual_seed(0)
    net = ds.create_supernet(name, drop_rate=0.5, **kwargs)  # dropout is off in eval mode
    randomize(net)
    rng = random.Random(0)
    archs = [net.space.sample(rng) for _ in range(n)] or [net.space.largest(), net.space.smallest()]
    check_extraction(net, archs, size)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("mobilenet_v1", {}),
        ("mobilenet_v2", {}),
        ("mobilenet_v2", {"kernel_sizes": (3, 5, 7)}),
        ("dsmbnet", {}),
        ("dsmbnet_teacher", {}),
    ],
)
def test_imagenet_subnets_equal_extracted_at_64px(name, kwargs):
    torch.manual_seed(0)
    net = ds.create_supernet(name, input_size=64, **kwargs)
    assert net.input_size == (3, 64, 64)
    randomize(net)
    archs = list(dict.fromkeys([net.space.largest(), net.space.sample(1)]))
    check_extraction(net, archs, net.input_size)


@pytest.mark.parametrize("name", ["mobilenet_v1_small", "mobilenet_v2_small", "dsmbnet_small"])
def test_small_variants_end_at_4x4(name):
    net = ds.create_supernet(name, in_chans=1)
    arch = net.space.largest()
    y = net.forward_to(torch.zeros(1, 1, 28, 28), arch, net.n_stages)
    assert y.shape[-2:] == (4, 4)
    assert net.forward_head(y, arch).shape == (1, 10)


def test_every_dim_is_read_and_changes_the_network():
    torch.manual_seed(0)
    # train-mode BN (batch statistics) and no dropout: the output depends on every layer
    net = ds.create_supernet("mobilenet_v2_small", kernel_sizes=(3, 5, 7), drop_rate=0.0).train()
    randomize(net)
    read = {d for i in range(-1, net.n_stages + 1) for d in net.stage_dims(i)}
    assert read == set(net.space.names)
    kinds = {d.name: d.kind for d in net.space.dims}
    assert kinds["s3.k"] == "kernel" and net.space["s3.k"].choices == (3, 5, 7)
    assert "s0.exp" not in kinds and "s6.exp" not in kinds  # t == 1 / a single block: no expansion dim
    x = images(4, (3, 32, 32))
    largest = net.space.largest()
    with torch.no_grad():
        ref = net(x, largest)
        for dim in net.space.dims:
            y = net(x, largest.replace(**{dim.name: dim.min}))
            assert not torch.allclose(y, ref), f"{dim.name} does not change the output"


def test_gradients_stay_inside_the_active_slices():
    torch.manual_seed(0)
    # MobileNetV2 with kernel slicing: a pointwise, a depthwise (centre crop) and a BN weight
    net = ds.create_supernet("mobilenet_v2_small", kernel_sizes=(3, 5, 7)).train()
    arch = net.space.smallest()  # every width at its minimum, 3x3 kernels cropped from 7x7
    net(torch.randn(4, 3, 32, 32), arch).sum().backward()
    blk = net.features[4]  # stage 2, first block: input s1.out, hidden 6 * s1.out, output s2.out
    hidden, out = 6 * arch["s1.out"], arch["s2.out"]
    expand, dw, project = blk.conv[0][0].weight.grad, blk.conv[1][0].weight.grad, blk.conv[2].weight.grad
    assert expand[:hidden, : arch["s1.out"]].abs().sum() > 0
    assert expand[hidden:].abs().sum() == 0 and expand[:, arch["s1.out"] :].abs().sum() == 0
    assert dw[:hidden, :, 2:5, 2:5].abs().sum() > 0
    mask = torch.ones_like(dw, dtype=torch.bool)
    mask[:hidden, :, 2:5, 2:5] = False
    assert dw[mask].abs().sum() == 0
    assert project[out:].abs().sum() == 0 and project[:, hidden:].abs().sum() == 0
    bn = blk.conv[3].weight.grad
    assert bn[:out].abs().sum() > 0 and bn[out:].abs().sum() == 0

    # DS-MBNet: the SE bottleneck is fixed, its channel side sliced; the classifier's input sliced
    net = ds.create_supernet("dsmbnet_small").train()
    arch = net.space.smallest()
    net(torch.randn(4, 3, 32, 32), arch).sum().backward()
    se = net.features[8].se  # a non-first s3 block: input width s3
    c = arch["s3"]
    reduce, expand = se.conv_reduce.weight.grad, se.conv_expand.weight.grad
    assert reduce[:, :c].abs().sum() > 0 and reduce[:, c:].abs().sum() == 0
    assert expand[c:].abs().sum() == 0 and se.conv_expand.bias.grad[c:].abs().sum() == 0
    fc = net.classifier[1].weight.grad
    assert fc[:, : arch["s4"]].abs().sum() > 0 and fc[:, arch["s4"] :].abs().sum() == 0


def test_bad_arch_names_the_dimension():
    net = ds.create_supernet("mobilenet_v2_small")
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="s2.exp"):
        net(x, net.space.largest().replace(**{"s2.exp": 7}))
    with pytest.raises(ValueError, match="s4.out"):
        net(x, {k: v for k, v in net.space.largest().items() if k != "s4.out"})
    mb1 = ds.create_supernet("mobilenet_v1_small")
    with pytest.raises(ValueError, match="s3"):
        mb1(x, mb1.space.largest().replace(s3=1000))


def test_dsmbnet_ties_s3_and_s4():
    net = ds.create_supernet("dsmbnet")
    space = net.space
    assert space["s3"].choices == tuple(range(224, 641, 32))
    assert space["s4"].choices == tuple(range(736, 1153, 32))
    assert len(space) == 14
    for arch in space:
        assert space.index(arch)[0] == space.index(arch)[1]
    with pytest.raises(ValueError, match="tied"):
        net(torch.zeros(1, 3, 64, 64), {"s3": 224, "s4": 1152})
    small = ds.create_supernet("dsmbnet_small")
    assert len(small.space) == 14 and all(v % 8 == 0 for d in small.space.dims for v in d.choices)


def flop_macs(model: nn.Module, size: tuple[int, int, int]) -> int:
    model = model.to("meta").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, *size, device="meta"))
    return counter.get_total_flops() // 2


@pytest.fixture(scope="module")
def mbv1():
    return ds.create_supernet("mobilenet_v1")


@pytest.fixture(scope="module")
def mbv2():
    return ds.create_supernet("mobilenet_v2")


@pytest.fixture(scope="module")
def dsmb():
    return ds.create_supernet("dsmbnet")


def test_count_macs_equals_torch_counter(mbv1, mbv2, dsmb):
    rng = random.Random(0)
    tiny_kernels = DSMobileNetV2(
        ((1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2)),
        stem_width=16,
        last_channel=64,
        num_classes=10,
        kernel_sizes=(3, 5, 7),
        small_input=True,
        ratios=(0.5, 0.75, 1.0),
    )
    for net in (mbv1, mbv2, dsmb, tiny_kernels):  # (the analytic model checks 3 more archs itself)
        arch = net.space.sample(rng)
        sub = ds.extract_subnet(net, arch)
        assert ds.count_macs(net, arch) == flop_macs(sub, net.input_size), arch


def test_published_macs(mbv1, mbv2, dsmb):
    def close(got, want_millions, tol=0.02):
        assert abs(got / 1e6 - want_millions) <= tol * want_millions, (got, want_millions)

    # Slimmable Networks' MobileNetV1 x1.0 / 0.75 / 0.5
    for r, want in ((1.0, 569), (0.75, 325), (0.5, 150)):
        close(ds.count_macs(mbv1, mbv1.space.uniform(r)), want)
    close(ds.count_macs(mbv2, mbv2.space.largest()), 301, 0.01)

    # torchvision's width_mult MobileNetV2 is a subnet too (hidden = t x the block's input)
    def torchvision_arch(r: float) -> dict[str, int]:
        arch = {"stem": make_divisible(32 * r)}
        for i, (t, c, _, _) in enumerate(MBV2_SETTINGS):
            arch[f"s{i}.out"] = make_divisible(c * r)
            if f"s{i}.exp" in mbv2.space.names:
                arch[f"s{i}.exp"] = t * make_divisible(c * r)
        return arch

    for r, want in ((0.75, 209), (0.5, 97)):
        close(ds.count_macs(mbv2, torchvision_arch(r)), want, 0.01)
    tv = torchvision.models.mobilenet_v2(width_mult=0.75)
    assert ds.count_macs(mbv2, torchvision_arch(0.75)) == flop_macs(tv, (3, 224, 224))
    # DS-MBNet's released supernet: 133 ... 565 MAdds for its 14 subnets
    released = (133, 153, 175, 200, 226, 255, 286, 319, 355, 393, 433, 475, 519, 565)
    for arch, want in zip(dsmb.space, released, strict=True):
        close(ds.count_macs(dsmb, arch), want, 0.01)


def test_largest_mobilenet_v2_is_torchvision(mbv2):
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2()
    assert ds.count_params(mbv2, mbv2.space.largest()) == sum(p.numel() for p in tv.parameters())
    with torch.no_grad():  # perturbed statistics, so a wrong mapping cannot pass
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.1)
        tv.classifier[1].weight.normal_(0, 0.5)
    tv.eval()
    net = ds.create_supernet("mobilenet_v2", input_size=96).eval()
    ds.load_pretrained(net, tv.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want, got = tv(x), net(x, net.space.largest())
    assert want.abs().max() > 0.1
    assert (want - got).abs().max() <= 1e-4
    sub = ds.extract_subnet(net, net.space.largest())
    assert set(sub.state_dict()) == set(tv.state_dict())
