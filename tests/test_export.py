"""extract_subnet and count_macs/count_params on whole supernets."""

import io
import random
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dynaslice as ds
from dynaslice.counting import meta_copy, resource_model


def small_net(seed: int = 0) -> ds.Supernet:
    torch.manual_seed(seed)
    net = ds.create_supernet("resnet_small", in_chans=1, input_size=28, num_classes=10)
    # non-trivial BN statistics and affine parameters, so that a wrong slice shows
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if name.endswith(("running_mean", "bias")):
                t.normal_(0, 0.2)
            elif name.endswith("running_var") or name.endswith("bn1.weight"):
                t.uniform_(0.5, 2.0)
    return net.eval()


def no_dynaslice_inside(model: torch.nn.Module) -> bool:
    return all(not type(m).__module__.startswith("dynaslice") for m in model.modules())


def test_extracted_subnet_equals_supernet_on_random_archs():
    net = small_net()
    x = torch.randn(4, 1, 28, 28)
    rng = random.Random(0)
    archs = [net.space.largest(), net.space.smallest()] + [net.space.sample(rng) for _ in range(18)]
    for arch in archs:
        sub = ds.extract_subnet(net, arch)
        assert no_dynaslice_inside(sub)
        with torch.no_grad():
            torch.testing.assert_close(sub(x), net(x, arch), rtol=0, atol=1e-5)
        assert sum(p.numel() for p in sub.parameters()) == ds.count_params(net, arch)


def test_extraction_imagenet_layout_bottleneck():
    torch.manual_seed(0)
    net = ds.create_supernet("resnet50", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    for arch in (net.space.uniform(0.5), net.space.sample(3)):
        sub = ds.extract_subnet(net, arch, input_size=(3, 64, 64))
        with torch.no_grad():
            torch.testing.assert_close(sub(x), net(x, arch), rtol=0, atol=1e-5)
        # module names mirror the supernet's
        assert isinstance(sub.get_submodule("layer3.0.downsample.0"), torch.nn.Conv2d)


def test_extracted_subnet_is_independent_and_trains_like_the_supernet():
    net = small_net().train()
    arch = net.space.uniform(0.5)
    sub = ds.extract_subnet(net, arch)
    assert sub.training
    x = torch.randn(8, 1, 28, 28)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.testing.assert_close(sub(x), net(x, arch), rtol=0, atol=1e-5)  # batch statistics
    sub.get_submodule("conv1").weight.data.zero_()  # no storage shared with the supernet
    net.load_state_dict(before)
    assert net.conv1.weight.abs().sum() > 0
    # gradients flow in the extracted model like in any torch model
    sub(x).sum().backward()
    assert all(p.grad is not None for p in sub.parameters() if p.requires_grad)


def test_extracted_subnet_pickles_and_loads_without_dynaslice(tmp_path):
    net = small_net()
    arch = net.space.sample(7)
    sub = ds.extract_subnet(net, arch)
    path = tmp_path / "sub.pt"
    torch.save(sub, path)
    x = torch.randn(2, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    torch.save(sub(x).detach(), tmp_path / "y.pt")
    code = (
        "import sys, torch\n"
        "sys.modules['dynaslice'] = None  # any import of dynaslice now fails\n"
        f"m = torch.load({str(path)!r}, weights_only=False)\n"
        f"x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})\n"
        "assert torch.allclose(m(x), y, atol=1e-6), 'outputs differ'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_extracted_subnet_scripts_and_exports():
    net = small_net()
    arch = net.space.sample(2)
    sub = ds.extract_subnet(net, arch)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(torch.jit.script(sub)(x), sub(x), rtol=0, atol=1e-6)
    exported = torch.export.export(sub, (x,))
    torch.testing.assert_close(exported.module()(x), sub(x), rtol=0, atol=1e-6)


def test_extraction_rejects_bad_arch():
    net = small_net()
    with pytest.raises(ValueError, match="s2=40 is not allowed"):
        ds.extract_subnet(net, net.space.largest().replace(s2=40))


def test_supernet_forward_errors_for_people():
    net = small_net()
    with pytest.raises(ValueError, match=r"missing \['s4'\]"):
        net(torch.randn(1, 1, 28, 28), {"s1": 16, "s2": 32, "s3": 64})


def test_supernet_gradients_only_in_active_slices():
    net = small_net().train()
    arch = net.space.smallest()
    net(torch.randn(4, 1, 28, 28), arch).sum().backward()
    w = net.layer2[1].conv1.weight.grad
    k = arch["s2"]
    assert w[:k, :k].abs().sum() > 0
    assert w[k:].abs().max() == 0 and w[:, k:].abs().max() == 0
    bn = net.layer3[0].bn1
    assert bn.weight.grad[arch["s3"] :].abs().max() == 0


def meta_flops_macs(model: torch.nn.Module, input_size) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta_copy_model = meta_like(model)
        meta_copy_model(torch.empty(1, *input_size, device="meta"))
    return counter.get_total_flops() // 2


def meta_like(model: torch.nn.Module) -> torch.nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False).to("meta")


@pytest.mark.parametrize("name,size", [("resnet_small", (1, 28, 28)), ("resnet18", (3, 64, 64))])
def test_count_macs_equals_torch_flop_counter_on_extracted_subnet(name, size):
    torch.manual_seed(0)
    kw = {"in_chans": 1, "input_size": 28} if name == "resnet_small" else {}
    net = ds.create_supernet(name, **kw).eval()
    rng = random.Random(1)
    archs = [net.space.largest(), net.space.smallest()] + [net.space.sample(rng) for _ in range(5)]
    macs = ds.count_macs(net, archs, input_size=size)
    for arch, m in zip(archs, macs, strict=True):
        sub = ds.extract_subnet(net, arch, input_size=size)
        assert m == meta_flops_macs(sub, size) == ds.count_macs(net, arch, input_size=size)
        assert ds.count_params(net, arch) == sum(p.numel() for p in sub.parameters())


def test_count_macs_matches_published_resnet50():
    net = ds.create_supernet("resnet50")
    # torchvision's ResNet-50: 4.09 GMACs, 25.56 M parameters (Slimmable Networks: 4.1 G)
    assert ds.count_macs(net, net.space.largest()) == 4_089_184_256
    assert ds.count_params(net, net.space.largest()) == 25_557_032
    # Slimmable Networks' x0.5: 1.1 G; our grid's uniform(0.5) is the same widths
    assert abs(ds.count_macs(net, net.space.uniform(0.5)) / 1.1e9 - 1) < 0.05


def test_count_macs_vectorised_matches_scalar_and_is_monotone():
    net = small_net()
    rm = resource_model(net)
    archs = [net.space.sample(i) for i in range(1000)]
    many = rm.macs(archs)
    assert [ds.count_macs(net, a) for a in archs[:20]] == many[:20].tolist()
    # widening any one dimension never lowers MACs
    for a in archs[:50]:
        for d in net.space.dims:
            bigger = [c for c in d.choices if c > a[d.name]]
            if bigger:
                assert ds.count_macs(net, a.replace(**{d.name: bigger[0]})) > ds.count_macs(net, a)


def test_meta_copy_holds_no_data():
    net = small_net()
    m = meta_copy(net)
    assert all(p.device.type == "meta" for p in m.parameters())
    assert next(net.parameters()).device.type == "cpu"


def test_seeded_construction_is_deterministic():
    a, b = small_net(3), small_net(3)
    x = torch.randn(2, 1, 28, 28)
    arch = a.space.sample(11)
    torch.testing.assert_close(a(x, arch), b(x, arch), rtol=0, atol=0)
