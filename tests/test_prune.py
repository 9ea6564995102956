"""dynaslice.prune: channel groups and surgery, exact costs, DCFF, White-Box, 1xN and the baselines."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynaslice as ds
from dynaslice.data import BatchLoader
from dynaslice.prune import (
    FitConfig,
    PruningError,
    channel_groups,
    check_compact,
    count_model_macs,
    count_model_params,
    dcff_train,
    export_onnx,
    magnitude_prune,
    onexn_prune,
    prune_channels,
    prune_l1,
    prune_random,
    resolve_widths,
    train_from_scratch,
    whitebox_prune,
)
from dynaslice.prune._fit import fit, fit_if
from dynaslice.prune.common import CostModel, prunable_groups
from dynaslice.prune.dcff import (
    FusedConv2d,
    _assign_slots,
    dcff_scores,
    fuse_model,
    temperature,
    to_compact,
    update_fusion,
)
from dynaslice.prune.onexn import apply_masks, block_mask, rearrange_filters, sparse_layers
from dynaslice.prune.whitebox import (
    ClassMask,
    WhiteBoxLoss,
    add_class_masks,
    global_vote,
    strip_class_masks,
)
from dynaslice.train.data import synthetic_dataset

SIZE = (1, 8, 8)
TINY_FIT = FitConfig(epochs=1, lr=0.05, warmup_epochs=0)


def plain_model(seed: int = 0) -> torch.fx.GraphModule:
    """resnet_small's largest subnet at 8x8, with non-trivial BN statistics and affine parameters."""
    torch.manual_seed(seed)
    net = ds.create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=8)
    model = ds.extract_subnet(net, net.space.largest())
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("running_mean", "bias")):
                t.normal_(0, 0.2)
            elif name.endswith(("running_var", "bn1.weight", "bn2.weight")):
                t.uniform_(0.5, 2.0)
    return model.eval()


def loader(n: int = 64, batch: int = 32) -> BatchLoader:
    return BatchLoader(synthetic_dataset(n, size=8), batch, seed=0, drop_last=True)


def torch_macs(model: nn.Module) -> int:
    """torch's own count, on the real model (not the meta copy the library counts on)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        copy.deepcopy(model).eval()(torch.zeros(1, *SIZE))
    return counter.get_total_flops() // 2


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


X = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- groups and surgery


def test_channel_groups_of_a_resnet():
    gm, groups = channel_groups(plain_model(), SIZE)
    internal = [n for n, g in groups.items() if g.internal]
    assert internal == [f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)]
    stem = groups["conv1"]  # the stem feeds layer1's identity shortcuts: one tied group
    assert stem.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2") and stem.residual
    stage2 = groups["layer2.0.conv2"]
    assert set(stage2.producers) == {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"}
    assert "layer3.0.downsample.0" in stage2.consumers
    assert groups["fc"].fixed and not groups["layer4.0.conv2"].fixed
    assert prunable_groups(groups, "all") == [n for n, g in groups.items() if not g.fixed]


def test_unknown_op_is_an_error_naming_it():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.cumsum(self.conv(x), 1).mean((2, 3)))

    with pytest.raises(PruningError, match="cumsum"):
        channel_groups(Odd(), SIZE)


@pytest.mark.parametrize("group", ["layer2.1.conv1", "conv1", "layer3.0.conv2"])
def test_pruning_dead_channels_preserves_the_function(group):
    """Channels whose BN outputs are 0 carry nothing: removing them must not change the logits."""
    model = plain_model()
    gm, groups = channel_groups(model, SIZE)
    dead = [0, 3, 5]
    with torch.no_grad():
        for norm in groups[group].norms:
            bn = gm.get_submodule(norm)
            bn.weight[dead], bn.bias[dead] = 0.0, 0.0
    keep = [c for c in range(groups[group].size) if c not in dead]
    pruned = prune_channels(gm, groups, {group: keep})
    torch.testing.assert_close(logits(pruned, X), logits(gm, X), rtol=0, atol=1e-5)
    assert count_model_params(pruned) < count_model_params(gm)
    check_compact(pruned)


@pytest.mark.parametrize("group", ["layer1.0.conv1", "layer2.0.conv2"])
def test_a_full_permutation_preserves_the_function(group):
    gm, groups = channel_groups(plain_model(), SIZE)
    perm = torch.randperm(groups[group].size, generator=torch.Generator().manual_seed(0))
    permuted = prune_channels(gm, groups, {group: perm})
    torch.testing.assert_close(logits(permuted, X), logits(gm, X), rtol=0, atol=1e-5)
    assert not torch.equal(permuted.get_submodule(group).weight, gm.get_submodule(group).weight)


def test_bad_keep_lists_are_errors():
    gm, groups = channel_groups(plain_model(), SIZE)
    with pytest.raises(PruningError, match="distinct"):
        prune_channels(gm, groups, {"layer1.0.conv1": [0, 0]})
    with pytest.raises(PruningError, match="distinct"):
        prune_channels(gm, groups, {"layer1.0.conv1": [16]})
    with pytest.raises(PruningError, match="unknown channel group"):
        prune_channels(gm, groups, {"layer1.0.bn1": [0]})
    with pytest.raises(PruningError, match="can't be pruned"):
        prune_channels(gm, groups, {"fc": [0]})


# --------------------------------------------------------------------------- costs and budgets


def test_cost_model_equals_torch_counter_on_random_widths():
    gm, groups = channel_groups(plain_model(), SIZE)
    costs = CostModel(gm, groups, SIZE)
    rng = np.random.default_rng(0)
    for _ in range(3):
        widths = {n: int(rng.integers(1, groups[n].size + 1)) for n in prunable_groups(groups, "all")}
        compact = prune_channels(gm, groups, {n: range(w) for n, w in widths.items()})
        assert costs(widths) == {"macs": torch_macs(compact), "params": count_model_params(compact)}


@pytest.mark.parametrize("include", ["internal", "all"])
def test_budget_is_the_widest_uniform_network_within_target(include):
    gm, groups = channel_groups(plain_model(), SIZE)
    target = count_model_macs(gm, SIZE) // 2
    widths = resolve_widths(gm, groups, SIZE, include, target_macs=target)
    costs = CostModel(gm, groups, SIZE)
    assert costs(widths)["macs"] <= target
    assert set(widths) == set(prunable_groups(groups, include))
    wider = {n: min(groups[n].size, w + 1) for n, w in widths.items()}
    assert costs(wider)["macs"] > target  # one more channel everywhere breaks the budget


def test_unreachable_targets_get_one_clear_error():
    model = plain_model()
    gm, groups = channel_groups(model, SIZE)
    with pytest.raises(PruningError, match="below the .* one channel in every prunable group"):
        resolve_widths(gm, groups, SIZE, "internal", target_macs=1000)
    with pytest.raises(PruningError, match="below"):
        prune_l1(model, SIZE, target_params=10)
    with pytest.raises(PruningError, match="exactly one"):
        resolve_widths(gm, groups, SIZE, widths={"layer1.0.conv1": 4}, target_macs=10**6)
    with pytest.raises(PruningError, match="1..16"):
        resolve_widths(gm, groups, SIZE, widths={"layer1.0.conv1": 17})


def test_sparse_macs_count_only_nonzero_weights():
    model = plain_model()
    conv = model.get_submodule("layer2.0.conv1")
    with torch.no_grad():
        conv.weight[:, ::2] = 0  # half the input channels
    dense, sparse = count_model_macs(model, SIZE), count_model_macs(model, SIZE, sparse=True)
    out_hw = 4 * 4  # layer2.0.conv1 has stride 2 on an 8x8 map
    assert dense == torch_macs(model)
    assert dense - sparse == conv.weight.numel() // 2 * out_hw


# --------------------------------------------------------------------------- baselines


def test_l1_keeps_largest_filters_and_fine_tunes():
    model = plain_model()
    with torch.no_grad():
        model.get_submodule("layer1.0.conv1").weight[5] *= 100  # the filter L1 must keep
    result = prune_l1(model, SIZE, widths={"layer1.0.conv1": 2}, train=loader(), finetune=TINY_FIT)
    assert result.model.get_submodule("layer1.0.conv1").out_channels == 2
    assert result.macs == torch_macs(result.model) and result.nominal_macs == result.macs
    assert result.history and math.isfinite(result.history[0]["loss"])
    kept = prune_l1(model, SIZE, widths={"layer1.0.conv1": 1})
    w = kept.model.get_submodule("layer1.0.conv1").weight
    torch.testing.assert_close(w[0], model.get_submodule("layer1.0.conv1").weight[5])


def test_random_and_scratch_share_the_architecture():
    model = plain_model()
    target = count_model_macs(model, SIZE) // 2
    l1 = prune_l1(model, SIZE, target_macs=target)
    rnd = prune_random(model, SIZE, widths=l1.widths, seed=3)
    scratch = train_from_scratch(model, SIZE, widths=l1.widths, seed=0, train=loader(), fit_config=TINY_FIT)
    assert l1.macs == rnd.macs == scratch.macs <= target
    assert l1.params == rnd.params == scratch.params
    conv = scratch.model.get_submodule("layer1.0.conv1").weight
    assert not torch.allclose(conv, l1.model.get_submodule("layer1.0.conv1").weight)


def test_fit_runs_fractional_epochs_and_pairs_its_arguments():
    model = plain_model().train()
    history = fit(model, loader(128), FitConfig(epochs=1.5, lr=0.01))
    assert [h["steps"] for h in history] == [4, 2]
    with pytest.raises(ValueError, match="both"):
        fit_if(model, loader(), None)


# --------------------------------------------------------------------------- DCFF


def test_temperature_schedule_endpoints():
    assert temperature(0, 10) == pytest.approx(1.0)
    assert temperature(10, 10) == pytest.approx(1e4)
    temps = [temperature(e, 10) for e in range(11)]
    assert temps == sorted(temps)


def test_dcff_scores_stay_ordered_at_high_temperature():
    """The official 1e-7-clamped KL ties every filter once P is one-hot; log space must not."""
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    p, scores = dcff_scores(w, 1e4)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(p, torch.eye(8, dtype=p.dtype))
    spread = torch.cdist(w.flatten(1), w.flatten(1)).sum(0).double()
    assert torch.argsort(scores).tolist() == torch.argsort(spread).tolist()
    p1, s1 = dcff_scores(w, 1.0)  # soft: rows are distributions, self most likely
    torch.testing.assert_close(p1.sum(1), torch.ones(8, dtype=p1.dtype))
    assert (p1.argmax(1) == torch.arange(8)).all() and len(set(s1.tolist())) == 8


def test_assign_slots_keeps_kept_filters_in_place():
    assert _assign_slots(None, [7, 2, 5]) == [2, 5, 7]
    assert _assign_slots([2, 5, 7], [7, 9, 2]) == [2, 9, 7]


def test_fused_conv_trains_all_filters_and_compacts_exactly():
    model = plain_model().train()
    gm, groups = channel_groups(model, SIZE)
    widths = resolve_widths(gm, groups, SIZE, "all", target_macs=count_model_macs(gm, SIZE) // 2)
    fused = fuse_model(gm, SIZE, widths)
    update_fusion(fused, 0, 4)  # T = 1: soft fusion, every filter contributes
    fused(X).sum().backward()
    conv = fused.get_submodule("layer2.0.conv1")
    assert isinstance(conv, FusedConv2d) and conv.out_channels == widths["layer2.0.conv1"]
    assert (conv.weight.grad.flatten(1).abs().sum(1) > 0).all()  # unselected filters learn too
    compact = to_compact(fused)
    check_compact(compact)
    torch.testing.assert_close(logits(compact, X), logits(fused, X), rtol=0, atol=1e-5)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_dcff_train_one_call():
    model = plain_model()
    before = copy.deepcopy(model)
    target = count_model_macs(model, SIZE) // 2
    result = dcff_train(model, SIZE, loader(), FitConfig(epochs=2, lr=0.05), target_macs=target)
    assert result.macs == torch_macs(result.model) <= target
    assert result.info["temperatures"][0] == pytest.approx(1.0) and len(result.info["temperatures"]) == 2
    assert same_state(model, before)  # the caller's model is not trained in place
    with pytest.raises(PruningError, match="below"):
        dcff_train(model, SIZE, loader(), TINY_FIT, target_macs=100)


# --------------------------------------------------------------------------- White-Box


def test_class_masks_of_ones_preserve_the_function_and_strip_cleanly():
    model = plain_model()
    masked = add_class_masks(model, SIZE, num_classes=10)
    y = torch.randint(10, (len(X),))
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(X, y), logits(model, X), rtol=0, atol=1e-6)
    masks = [m for m in masked.modules() if isinstance(m, ClassMask)]
    assert len(masks) == 8
    with torch.no_grad():  # a mask that matters, then stripped: the plain network again
        masks[0].mask.mul_(0.5)
    stripped = strip_class_masks(masked)
    assert not any(isinstance(m, ClassMask) for m in stripped.modules())
    torch.testing.assert_close(logits(stripped, X), logits(model, X), rtol=0, atol=1e-6)


def test_class_mask_uses_the_label_row_and_learns_class_wise():
    mask = ClassMask(3, num_classes=4)
    with torch.no_grad():
        mask.mask.copy_(torch.arange(12.0).view(4, 3))
    x = torch.ones(2, 3, 2, 2)
    out = mask.eval()(x, torch.tensor([1, 3]))
    torch.testing.assert_close(out[:, :, 0, 0], torch.tensor([[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]))
    mask.train()(x, torch.tensor([2, 2])).sum().backward()
    assert mask.mask.grad[2].abs().sum() > 0  # the label's row always gets the full gradient


def test_whitebox_loss_adds_the_regulariser():
    masked = add_class_masks(plain_model(), SIZE, num_classes=10).eval()
    y = torch.randint(10, (len(X),))
    torch.manual_seed(0)
    plain = WhiteBoxLoss(0.0)(masked, X, y)
    reg = WhiteBoxLoss(1e-2)(masked, X, y)
    expected = sum(m.mask.sum(0).norm(2) for m in masked.modules() if isinstance(m, ClassMask))
    torch.testing.assert_close(reg - plain, 1e-2 * expected)


def test_global_vote_meets_target_with_minimum_per_layer():
    gm, groups = channel_groups(plain_model(), SIZE)
    names = prunable_groups(groups, "internal")
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(groups[n].size, generator=g) for n in names}
    scores["layer1.0.conv1"] *= 1e-3  # a layer the vote empties: the minimum must hold
    target = count_model_macs(gm, SIZE) // 2
    keep = global_vote(gm, groups, scores, SIZE, target, min_keep=0.3)
    costs = CostModel(gm, groups, SIZE)
    assert costs({n: len(k) for n, k in keep.items()})["macs"] <= target
    assert len(keep["layer1.0.conv1"]) == int(16 * 0.3)
    assert keep["layer1.0.conv1"] == sorted(torch.topk(scores["layer1.0.conv1"], 4).indices.tolist())
    for n in names:  # within a layer, kept channels outscore dropped ones
        dropped = [s for i, s in enumerate(scores[n].tolist()) if i not in keep[n]]
        assert not dropped or min(scores[n][keep[n]].tolist()) >= max(dropped)
    with pytest.raises(PruningError, match="minimum"):
        global_vote(gm, groups, scores, SIZE, 1000, min_keep=0.3)


def test_whitebox_prune_one_call():
    model = plain_model()
    before = copy.deepcopy(model)
    target = count_model_macs(model, SIZE) // 2
    result = whitebox_prune(model, SIZE, 10, loader(), target, TINY_FIT, TINY_FIT)
    assert result.macs == torch_macs(result.model) <= target
    assert len(result.history) == 2 and set(result.widths) == set(result.info["scores"])
    assert same_state(model, before)


# --------------------------------------------------------------------------- 1xN and magnitude


def test_block_mask_prunes_whole_blocks_of_smallest_norm():
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w[4:8, 1] *= 1e-3  # the weakest block: output kernels 4..7 at input channel 1
    mask = block_mask(w, 4, 0.5)
    blocks = mask.view(2, 4, 3, 9)
    assert ((blocks == 0).all(dim=(1, 3)) | (blocks == 1).all(dim=(1, 3))).all()  # whole blocks
    assert int((blocks[:, 0, :, 0] == 0).sum()) == 3  # int(0.5 * 6) blocks dropped
    assert (mask[4:8, 1] == 0).all()
    with pytest.raises(PruningError, match="1x3"):
        block_mask(w, 3, 0.5)


def test_rearrangement_preserves_the_function_and_sorts_filters():
    gm, groups = channel_groups(plain_model(), SIZE)
    layers = sparse_layers(gm)
    assert "conv1" not in layers and "layer2.0.downsample.0" in layers
    rearranged, perms = rearrange_filters(gm, groups, layers)
    assert set(perms) == {n for n, g in groups.items() if g.internal}  # residual streams stay
    torch.testing.assert_close(logits(rearranged, X), logits(gm, X), rtol=0, atol=1e-5)
    norms = rearranged.get_submodule("layer3.0.conv1").weight.abs().flatten(1).sum(1)
    assert torch.all(norms[1:] >= norms[:-1])


@pytest.mark.parametrize("rearrange", [True, False])
def test_onexn_result_keeps_its_zeros_and_reports_nominal_macs(rearrange):
    model = plain_model()
    before = copy.deepcopy(model)
    result = onexn_prune(
        model, SIZE, n=4, sparsity=0.5, rearrange=rearrange, train=loader(), finetune=TINY_FIT
    )
    check_compact(result.model)  # masks removed: a plain model
    for name in result.info["layers"]:
        w = result.model.get_submodule(name).weight
        blocks = w.view(w.shape[0] // 4, 4, w.shape[1], -1)
        zero = (blocks == 0).all(dim=(1, 3))
        assert zero.float().mean() == pytest.approx(0.5)
    assert result.macs == torch_macs(result.model) == count_model_macs(model, SIZE)  # it runs dense
    assert result.nominal_macs < 0.6 * result.macs
    assert result.params == count_model_params(model) and result.nonzero_params < 0.6 * result.params
    assert same_state(model, before)


def test_magnitude_baseline_matches_onexn_parameters():
    model = plain_model()
    blocks = onexn_prune(model, SIZE, n=8, sparsity=0.5)
    unstructured = magnitude_prune(model, SIZE, sparsity=0.5)
    zeros = lambda r: sum(int((r.model.get_submodule(n).weight == 0).sum()) for n in r.info["layers"])  # noqa: E731
    assert zeros(blocks) == zeros(unstructured)
    assert blocks.info["layers"] == unstructured.info["layers"]


# --------------------------------------------------------------------------- results and export


def test_check_compact_rejects_methods_internals():
    model = plain_model()
    gm, groups = channel_groups(model, SIZE)
    fused = fuse_model(gm, SIZE, {"layer1.0.conv1": 8})
    with pytest.raises(TypeError, match="FusedConv2d"):
        check_compact(fused)
    masked = apply_masks(gm, {"layer1.0.conv1": torch.ones(16, 16, 3, 3)})
    with pytest.raises(TypeError, match="hooks"):
        check_compact(masked)


def test_pruned_network_exports_to_onnx_and_runs(tmp_path):
    pytest.importorskip("onnxruntime")
    from dynaslice.runtime import OnnxModel

    model = plain_model()
    result = prune_l1(model, SIZE, target_macs=count_model_macs(model, SIZE) // 2)
    result.model.train()
    path = export_onnx(result, tmp_path / "l1.onnx")
    assert result.model.training  # the export works on a copy
    np.testing.assert_allclose(
        OnnxModel(path)(X.numpy()), logits(result.model, X).numpy(), rtol=1e-4, atol=1e-4
    )
