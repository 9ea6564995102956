"""DS-ViT: exact extraction, slice-local gradients, real depth skipping, MACs against torch and DeiT."""

import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynaslice as ds
from dynaslice.counting import meta_copy
from dynaslice.nn import SlicedLinear


def build(name: str, **kwargs) -> ds.Supernet:
    """A supernet in eval mode whose LayerNorm gammas and all biases are not their 1/0 init,
    so that slicing them wrongly shows up in the outputs."""
    torch.manual_seed(0)
    net = ds.create_supernet(name, **kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def small28() -> ds.Supernet:
    return build("vit_small_input", in_chans=1, input_size=28)


@pytest.fixture(scope="module")
def small32() -> ds.Supernet:
    return build("vit_small_input", in_chans=3, input_size=32)


def assert_plain_torch(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not type(m).__module__.startswith("dynaslice"), f"{name or 'root'} is {type(m)}"
    assert "dynaslice" not in model.code


def archs_of(net: ds.Supernet, n: int, seed: int) -> list[ds.Arch]:
    rng = random.Random(seed)
    return [net.space.smallest(), net.space.largest()] + [net.space.sample(rng) for _ in range(n - 2)]


@pytest.mark.parametrize("variant", ["small28", "small32"])
def test_extracted_subnet_equals_sliced(variant, request):
    net = request.getfixturevalue(variant)
    x = torch.randn(4, *net.input_size)
    for arch in archs_of(net, 10, seed=len(variant)):  # 10 archs per input size, 20 in all
        static = ds.extract_subnet(net, arch).eval()
        assert_plain_torch(static)
        with torch.no_grad():
            want, got = net(x, arch), static(x)
        assert want.shape == (4, net.num_classes)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m, a=arch: f"{a}: {m}")
        assert sum(p.numel() for p in static.parameters()) == ds.count_params(net, arch)


def test_vit_small_at_224_extracts_exactly_and_has_deit_s_size():
    torch.manual_seed(0)
    net = ds.create_supernet("vit_small").eval()
    x = torch.randn(1, 3, 224, 224)
    largest = net.space.largest()
    for arch in (largest, net.space.sample(random.Random(1))):
        static = ds.extract_subnet(net, arch).eval()
        assert_plain_torch(static)
        with torch.no_grad():
            torch.testing.assert_close(static(x), net(x, arch), atol=1e-5, rtol=0)
        if arch == largest:
            # DeiT-S: "4.6 GFLOPs" (fvcore/timm count multiply-accumulates) and timm's 22,050,664
            # parameters less the class token, folded here into row 0 of the position table.
            assert torch_macs(static, net.input_size) == pytest.approx(4.6e9, rel=0.01)
            assert sum(p.numel() for p in static.parameters()) == 22_050_664 - 384


def test_extracted_vit_uses_plain_embedding_for_class_token_and_positions(small28):
    arch = small28.space.uniform(0.5)
    static = ds.extract_subnet(small28, arch)
    assert isinstance(static.get_submodule("pos_embed"), nn.Embedding)
    assert static.get_submodule("pos_embed").weight.shape == (7 * 7 + 1, arch["embed"])
    assert isinstance(static.get_submodule("patch_embed"), nn.Conv2d)
    assert static.get_submodule("blocks.0.attn.qkv").out_features == 3 * 32 * arch["heads"]


def test_gradients_match_static_subnet_and_vanish_outside_slices(small32):
    net = small32.train()
    try:
        arch = ds.Arch(embed=72, heads=2, mlp=152, depth=4)  # every dim strictly inside its range
        static = ds.extract_subnet(net, arch).train()
        x = torch.randn(2, *net.input_size)
        w = torch.randn(2, net.num_classes)
        net.zero_grad(set_to_none=True)
        (net(x, arch) * w).sum().backward()
        (static(x) * w).sum().backward()
        static_params = dict(static.named_parameters())
        modules = dict(net.named_modules())
        touched = 0
        for name, p in net.named_parameters():
            if name not in static_params:  # skipped blocks
                assert p.grad is None or not p.grad.any(), name
                continue
            s = static_params[name]
            g = p.grad.clone()
            owner = modules[name.rpartition(".")[0]]
            if isinstance(owner, SlicedLinear) and owner.chunks > 1:  # fused q/k/v: a prefix per chunk
                g = g.view(owner.chunks, owner.out_features, *g.shape[1:])
                s_grad = s.grad.view(owner.chunks, -1, *s.grad.shape[1:])
            else:
                s_grad = s.grad
            box = tuple(slice(0, n) for n in s_grad.shape)
            torch.testing.assert_close(g[box], s_grad, atol=1e-5, rtol=1e-4, msg=name)
            g[box] = 0
            assert not g.any(), f"{name}: gradient outside the active slice"
            touched += 1
        assert touched == len(static_params)
        assert all(f"blocks.{i}.attn.qkv.weight" not in static_params for i in range(4, 6))
    finally:
        net.eval()
        net.zero_grad(set_to_none=True)


def test_bad_archs_and_inputs_are_clear_errors(small32):
    x = torch.randn(1, 3, 32, 32)
    good = small32.space.largest()
    with pytest.raises(ValueError, match="missing \\['depth'\\]"):
        small32(x, {"embed": 128, "heads": 4, "mlp": 256})
    with pytest.raises(ValueError, match="heads=5 is not allowed"):
        small32(x, good.replace(heads=5))
    with pytest.raises(ValueError, match="embed=100 is not allowed"):
        small32(x, good.replace(embed=100))
    with pytest.raises(ValueError, match="depth=2 is not allowed"):
        ds.extract_subnet(small32, good.replace(depth=2))
    with pytest.raises(ValueError, match="built for 32x32 inputs"):
        small32(torch.randn(1, 3, 28, 28), good)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        ds.create_supernet("vit_small_input", input_size=30)


def test_depth_skips_blocks(small32):
    net = small32
    base = net.space.uniform(0.75)
    macs = [ds.count_macs(net, base.replace(depth=d)) for d in net.space["depth"].choices]
    steps = {b - a for a, b in zip(macs, macs[1:], strict=False)}
    assert len(steps) == 1 and steps.pop() > 0  # every extra block costs one block's MACs
    assert net.space["depth"].choices == (3, 4, 5, 6)

    shallow, deep = base.replace(depth=3), base.replace(depth=6)
    assert [m for m in ds.extract_subnet(net, shallow).state_dict() if m.startswith("blocks.3.")] == []
    x = torch.randn(2, *net.input_size)
    with torch.no_grad():
        before = net(x, shallow), net(x, deep)
        saved = [p.clone() for p in net.blocks[3:].parameters()]
        for p in net.blocks[3:].parameters():
            p.add_(torch.randn_like(p))
        after = net(x, shallow), net(x, deep)
        for p, s in zip(net.blocks[3:].parameters(), saved, strict=True):
            p.copy_(s)
    assert torch.equal(before[0], after[0])  # blocks 3.. never ran
    assert not torch.allclose(before[1], after[1])
    assert "depth" not in net.stage_dims(2) and "depth" in net.stage_dims(3)


def test_stem_stage_head_split(small28):
    arch = small28.space.sample(random.Random(5))
    x = torch.randn(2, *small28.input_size)
    with torch.no_grad():
        full = small28(x, arch)
        for cut in (0, 2, small28.n_stages):
            split = small28.forward_from(small28.forward_to(x, arch, cut), arch, cut)
            torch.testing.assert_close(split, full, atol=1e-6, rtol=0)


def test_dropout_survives_extraction():
    net = ds.create_supernet("vit_small_input", drop_rate=0.5)
    static = ds.extract_subnet(net, net.space.smallest())
    assert isinstance(static.get_submodule("head_drop"), nn.Dropout)
    x = torch.randn(8, *net.input_size)
    static.train()
    assert not torch.equal(static(x), static(x))
    static.eval()
    assert torch.equal(static(x), static(x))


def torch_macs(model: nn.Module, input_size) -> int:
    """torch's own count on a meta-device copy (FlopCounterMode counts SDPA only there)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta_copy(model)(torch.empty(1, *input_size, device="meta"))
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


@pytest.mark.parametrize("variant", ["small28", "small32"])
def test_count_macs_equals_flop_counter_on_extracted_subnet(variant, request):
    net = request.getfixturevalue(variant)
    for arch in archs_of(net, 5, seed=3):
        static = ds.extract_subnet(net, arch)
        assert ds.count_macs(net, arch) == torch_macs(static, net.input_size), arch


def test_vit_tiny_count_macs_matches_deit_ti_and_torch():
    # DeiT-Ti: "1.3 GFLOPs" (multiply-accumulates; 1.26 G unrounded) and timm's 5,717,416
    # parameters less the folded class token.
    net = ds.create_supernet("vit_tiny", depth_choices=1)  # one depth: 4x less counting work
    largest = net.space.largest()
    macs = ds.count_macs(net, largest)
    assert macs == pytest.approx(1.3e9, rel=0.05)
    assert macs == torch_macs(ds.extract_subnet(net, largest), net.input_size)
    assert ds.count_params(net, largest) == 5_717_416 - 192
