"""Channel-importance ordering: the largest subnet is unchanged, every tensor moves with its channels,
and the order is the documented one."""

import pytest
import torch
from torch import nn

import dynaslice as ds
from dynaslice.models.base import Supernet
from dynaslice.nn import SlicedBatchNorm2d, SlicedConv2d, SlicedLinear
from dynaslice.ordering import (
    OrderingError,
    channel_groups,
    channel_importance,
    describe_groups,
    reorder_channels,
)
from dynaslice.space import Dim, SearchSpace


def randomised(net: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics, BN affine parameters and biases away from their defaults, so a tensor that
    stayed behind while its channels moved would change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif name.endswith("running_var") or (t.dim() == 1 and name.endswith("weight")):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
    return net.eval()


FAMILIES = [
    ("resnet_small", {}, 28),
    ("resnet50", {"num_classes": 10}, 64),
    ("mobilenet_v1_small", {}, 28),
    ("mobilenet_v2_small", {}, 28),
    ("dsmbnet_small", {}, 32),
]


@pytest.mark.parametrize(("name", "kwargs", "side"), FAMILIES)
def test_largest_subnet_unchanged_for_every_conv_family(name, kwargs, side):
    torch.manual_seed(0)
    # float64: what is compared is the permutation, not float32 summation order (ResNet-50's
    # random-weight logits are in the thousands)
    net = randomised(ds.create_supernet(name, in_chans=1, input_size=side, **kwargs)).double()
    x = torch.randn(2, 1, side, side, dtype=torch.float64)
    largest, narrow = net.space.largest(), net.space.smallest()
    with torch.no_grad():
        before, before_narrow = net(x, largest), net(x, narrow)
    perms = reorder_channels(net)
    assert perms, "every family has sliced channel groups"
    moved = sum(int((p != torch.arange(len(p))).any()) for _, p in perms)
    assert moved > 0  # random weights are not already sorted
    with torch.no_grad():
        torch.testing.assert_close(net(x, largest), before, rtol=0, atol=1e-5)
        # narrow slices now hold other channels (that is the point)
        assert not torch.allclose(net(x, narrow), before_narrow, atol=1e-3)


def test_groups_follow_the_architecture():
    net = ds.create_supernet("resnet_small")
    # per basic stage: the residual stream (tied by the adds) and the middle of each of 2 blocks
    assert describe_groups(channel_groups(net)) == {
        "s1": [16, 16, 16],
        "s2": [32, 32, 32],
        "s3": [64, 64, 64],
        "s4": [128, 128, 128],
    }
    dsm = describe_groups(channel_groups(ds.create_supernet("dsmbnet_small")))
    assert dsm == {"s3": [320] * 6, "s4": [576] * 2}  # SE expand rows join their block's group


def test_bn_statistics_rows_move_with_their_channels():
    torch.manual_seed(0)
    net = randomised(ds.create_supernet("resnet_small"))
    bn = net.layer2[0].bn1  # the middle of block 0 of stage 2
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    gamma = bn.weight.detach().clone()
    conv1, conv2 = net.layer2[0].conv1.weight.detach().clone(), net.layer2[0].conv2.weight
    conv2_before = conv2.detach().clone()
    perms = reorder_channels(net)

    def perm_of(module, axis):
        (p,) = [p for g, p in perms if any((m.module, m.axis) == (module, axis) for m in g.members)]
        return p

    perm = perm_of("layer2.0.bn1", 0)
    assert mean.shape[0] == len(bn.widths) > 1  # one row per width, each permuted
    torch.testing.assert_close(bn.running_mean, mean[:, perm], rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, var[:, perm], rtol=0, atol=0)
    torch.testing.assert_close(bn.weight.detach(), gamma[perm], rtol=0, atol=0)
    # a conv's rows follow its output group, its columns its input group (stage 1's stream here)
    rows_cols = conv1[perm][:, perm_of("layer2.0.conv1", 1)]
    torch.testing.assert_close(net.layer2[0].conv1.weight.detach(), rows_cols, rtol=0, atol=0)
    rows_cols = conv2_before[perm_of("layer2.0.conv2", 0)][:, perm]
    torch.testing.assert_close(conv2.detach(), rows_cols, rtol=0, atol=0)
    # most important first: the consumer's column L1 norms are now descending
    l1 = conv2.detach().abs().sum((0, 2, 3))
    assert torch.all(l1[:-1] >= l1[1:])


class TinyResidual(Supernet):
    """conv1 -> BN -> ReLU -> conv2 -> BN, added to conv1's output (one tied group of 4 channels,
    width 2 or 4), read by conv2 and by the classifier."""

    def __init__(self):
        super().__init__()
        self.space = SearchSpace((Dim("w", (2, 4)),))
        self.input_size, self.num_classes, self.n_stages = (1, 6, 6), 3, 0
        self.conv1 = SlicedConv2d(1, 4, 3)
        self.bn1 = SlicedBatchNorm2d(4, (2, 4))
        self.conv2 = SlicedConv2d(4, 4, 3)
        self.bn2 = SlicedBatchNorm2d(4, (2, 4))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = SlicedLinear(4, 3)

    def stage_dims(self, i):
        return ("w",) if i == -1 else ()

    def forward_stem(self, x, arch):
        h = self.relu(self.bn1(self.conv1(x, arch["w"])))
        return self.relu(self.bn2(self.conv2(h, arch["w"])) + h)

    def forward_head(self, x, arch):
        return self.fc(torch.flatten(self.pool(x), 1))


def test_importance_order_on_a_hand_made_example():
    net = randomised(TinyResidual())
    with torch.no_grad():
        # conv2 reads channel c with L1 norm 1000 * [1, 2, 3, 4][c]; the classifier reads only channel 2
        net.conv2.weight.copy_(torch.tensor([1.0, 2, 3, 4]).view(1, 4, 1, 1).expand(4, 4, 3, 3) * 1000 / 36)
        net.fc.weight.copy_(torch.tensor([[0.0, 0, 1, 0]] * 3) / 3)
    (group,) = channel_groups(net)
    assert group.dim == "w" and group.size == 4
    assert {m.module for m in group.consumers()} == {"conv2", "fc"}
    # each consumer normalised to sum 1, then summed: [0.1, 0.2, 0.3, 0.4] + [0, 0, 1, 0]
    torch.testing.assert_close(channel_importance(net, group), torch.tensor([0.1, 0.2, 1.3, 0.4]))
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        before = net(x, net.space.largest())
    conv1 = net.conv1.weight.detach().clone()
    ((_, perm),) = reorder_channels(net)
    # unnormalised sums (1000, 2000, 3001, 4000) would give [3, 2, 1, 0]: normalising decides
    assert perm.tolist() == [2, 3, 1, 0]
    torch.testing.assert_close(net.conv1.weight.detach(), conv1[perm], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(net(x, net.space.largest()), before, rtol=0, atol=1e-6)


def test_transformers_are_refused_clearly():
    net = ds.create_supernet("vit_tiny", num_classes=10)
    with pytest.raises(OrderingError, match="ViT are out of scope"):
        channel_groups(net)


def test_not_a_supernet_is_a_type_error():
    with pytest.raises(TypeError, match="needs a Supernet"):
        channel_groups(nn.Linear(2, 2))


def test_gated_supernet_orders_only_the_dims_after_the_gate():
    from dynaslice.gate import GatedSupernet

    torch.manual_seed(0)
    net = GatedSupernet(
        randomised(ds.create_supernet("resnet_small", in_chans=1, input_size=28)), 1, 4
    ).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before, (_, logits) = net(x, net.space.largest()), net.trunk(x)
    groups = reorder_channels(net)
    assert describe_groups([g for g, _ in groups]) == {"s2": [32] * 3, "s3": [64] * 3, "s4": [128] * 3}
    with torch.no_grad():  # the gate and the layers before it are pinned: untouched
        torch.testing.assert_close(net(x, net.space.largest()), before, rtol=0, atol=1e-5)
        torch.testing.assert_close(net.trunk(x)[1], logits, rtol=0, atol=0)
