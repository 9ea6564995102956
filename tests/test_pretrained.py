"""load_pretrained: torchvision ResNet weights make the largest subnet *be* torchvision's model."""

import pytest
import torch
import torchvision
from torch import nn

import dynaslice as ds


def torchvision_model(name: str) -> nn.Module:
    """A randomly initialised torchvision model whose BN statistics and affine parameters are not
    the defaults (zero mean, unit variance, gamma 1, beta 0), so a loader that skipped or
    misplaced them would change the logits."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def leaves(model: nn.Module) -> dict[str, str]:
    """``name -> repr`` of every leaf module that does something (nn.Identity placeholders aside)."""
    return {
        n: repr(m)
        for n, m in model.named_modules()
        if not list(m.children()) and not isinstance(m, nn.Identity) and n
    }


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_largest_subnet_is_the_torchvision_model(name):
    tv = torchvision_model(name)
    net = ds.create_supernet(name)
    ds.load_pretrained(net, tv.state_dict())
    net.eval()
    largest = net.space.largest()
    x = torch.randn(2, 3, 128, 128)  # ResNets pool globally: a small image checks the same maths
    with torch.no_grad():
        want = tv(x)
        torch.testing.assert_close(net(x, largest), want, atol=1e-4, rtol=0)
        static = ds.extract_subnet(net, largest).eval()
        torch.testing.assert_close(static(x), want, atol=1e-4, rtol=0)

    # same modules, same names, same configuration (avgpool aside: (1, 1) vs 1 is the same op)
    ours, theirs = leaves(static), leaves(tv)
    assert ours.keys() == theirs.keys()
    differ = {n for n in ours if ours[n] != theirs[n]}
    assert differ <= {"avgpool"}, {n: (ours[n], theirs[n]) for n in differ}
    n_tv = sum(p.numel() for p in tv.parameters())
    assert sum(p.numel() for p in static.parameters()) == n_tv
    # and the state dicts line up one to one: the extracted subnet loads back into torchvision
    fresh = getattr(torchvision.models, name)(weights=None).eval()
    fresh.load_state_dict(static.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=1e-4, rtol=0)


def test_every_width_is_seeded_with_the_static_statistics():
    tv = torchvision_model("resnet18")
    net = ds.create_supernet("resnet18")
    ds.load_pretrained(net, tv.state_dict())
    bn, ref = net.layer2[0].bn1, tv.layer2[0].bn1
    for row, width in enumerate(bn.widths):
        assert torch.equal(bn.running_mean[row, :width], ref.running_mean[:width])
        assert torch.equal(bn.running_var[row, :width], ref.running_var[:width])
    assert (bn.num_batches_tracked == 7).all()


def test_mismatched_state_dicts_are_clear_errors():
    net = ds.create_supernet("resnet18")
    with pytest.raises(
        ValueError, match=r"does not match DSResNet: missing \[.*unexpected \['layer1.0.conv3.weight'"
    ):
        ds.load_pretrained(net, torchvision.models.resnet50(weights=None).state_dict())
    with pytest.raises(
        ValueError, match=r"shape mismatch for fc.weight: supernet \(1000, 512\), given \(10, 512\)"
    ):
        ds.load_pretrained(net, torchvision.models.resnet18(weights=None, num_classes=10).state_dict())
