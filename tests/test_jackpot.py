"""Lottery Jackpots (dynaslice.prune.jackpot) and the sparse weights file: the global-threshold
masks, the official score initialisation, gradients to the scores only, frozen weights and BN
affine with moving statistics, the top-k mask update, ``dynaslice prune jackpot`` and its errors."""

import itertools
import json

import pytest
import torch
from test_reliability import cli, one_line_error
from torch.nn.utils import parametrize

import dynaslice as ds
from dynaslice.prune import PruningError, check_compact, jackpot_prune
from dynaslice.prune.jackpot import (
    JackpotMask,
    JackpotTrainer,
    attach_masks,
    global_magnitude_masks,
    masked_layers,
    search_config,
    searched_masks,
)
from dynaslice.prune.sparse_file import load_sparse, save_sparse
from dynaslice.train import load_config
from dynaslice.train.optim import build_optimizer

torch.set_num_threads(1)
SIZE = (1, 8, 8)
TINY = [
    "data.name=synthetic", "data.image_size=8", "data.batch_size=16", "data.val_size=16",
    "data.synthetic_train=80", "data.synthetic_test=32", "train.epochs=1", "train.threads=1",
    "train.eval_every_epochs=0", "train.log_every_steps=1", "optim.lr=0.5", "prune.finetune_epochs=0.5",
]  # fmt: skip


def plain_model(seed: int = 0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    net = ds.create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=8)
    return ds.extract_subnet(net, net.space.largest()).eval()


def test_one_global_threshold_sets_each_layers_exact_sparsity():
    model = plain_model()
    layers, classifier = masked_layers(model)
    assert classifier == "fc" and "fc" not in layers and "conv1" in layers  # the stem is masked, fc is not
    weights = {n: model.get_submodule(n).weight for n in layers}
    masks = global_magnitude_masks(weights, 0.9)
    everything = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    kept = int(everything.numel() * 0.1)
    threshold = everything.sort(descending=True).values[kept - 1]
    assert sum(int(m.sum()) for m in masks.values()) == kept
    for name, w in weights.items():  # each layer prunes exactly its weights below the one threshold
        assert int((~masks[name]).sum()) == int((w.abs() < threshold).sum())
    rates = {n: 1 - m.float().mean().item() for n, m in masks.items()}
    assert max(rates.values()) - min(rates.values()) > 0.05  # layer-wise, not uniform


def test_magnitude_init_starts_at_the_magnitude_mask_and_only_scores_learn():
    model = plain_model()
    searched, magnitude = attach_masks(model, 0.8, "magnitude")
    found = searched_masks(searched)
    assert found.keys() == magnitude.keys() and all(torch.equal(found[n], magnitude[n]) for n in found)
    scores = searched.get_submodule("layer1.0.conv1").parametrizations["weight"][0].scores
    assert torch.equal(scores, torch.where(magnitude["layer1.0.conv1"], 1.0, 0.99))
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(searched(x), _masked_reference(model, magnitude)(x))
    searched.train()(torch.randn(4, *SIZE)).square().sum().backward()
    with_grad = {n for n, p in searched.named_parameters() if p.grad is not None}
    assert with_grad == {f"{n}.parametrizations.weight.0.scores" for n in magnitude}
    assert not any(p.requires_grad for n, p in searched.named_parameters() if not n.endswith("scores"))
    decayed, not_decayed = build_optimizer(searched, load_config(None, TINY).optim).param_groups
    assert len(decayed["params"]) == len(magnitude) and not not_decayed["params"]  # the scores, with decay


def _masked_reference(model, masks):
    """``model`` with its weights times the masks, by hand (no parametrization)."""
    ref = plain_model(seed=1)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, m in masks.items():
            ref.get_submodule(n).weight.mul_(m)
    return ref.eval()


def test_scores_get_the_straight_through_gradient():
    """dL/ds = dL/d(W*b) * W, also for pruned weights (the official GetMask)."""
    w = torch.randn(6, 3, 3, 3)
    keep = torch.rand(w.shape) > 0.5
    mask = JackpotMask(keep, torch.where(keep, 1.0, 0.99))
    g = torch.randn(w.shape)
    (mask(w) * g).sum().backward()
    torch.testing.assert_close(mask.scores.grad, g * w)


def test_the_mask_is_the_top_k_scores_after_an_update_and_holds_on_ties():
    keep = torch.tensor([True, True, False, False])
    mask = JackpotMask(keep, torch.tensor([1.0, 1.0, 0.99, 0.99]))
    with torch.no_grad():
        mask.scores.copy_(torch.tensor([0.5, 1.0, 2.0, 0.1]))
    assert mask.update() == 1 and mask.mask.tolist() == [0.0, 1.0, 1.0, 0.0]
    with torch.no_grad():
        mask.scores.copy_(torch.tensor([3.0, 1.0, 1.0, 1.0]))  # ties at the threshold: the code swaps nothing
    assert mask.update() == 0 and mask.mask.tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("init", ["uniform", "random"])
def test_other_inits_keep_each_layers_count(init):
    searched, magnitude = attach_masks(plain_model(), 0.9, init, seed=3)
    found = searched_masks(searched)
    assert all(int(found[n].sum()) == int(magnitude[n].sum()) for n in found)
    assert sum(int((found[n] & magnitude[n]).sum()) for n in found) < 0.5 * sum(
        int(m.sum()) for m in found.values()
    )


def test_a_search_moves_the_mask_and_bn_statistics_but_no_weight(tmp_path):
    model = plain_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = load_config(None, TINY)
    result = jackpot_prune(model, SIZE, 0.9, search_epochs=1.0, cfg=cfg, run_dir=tmp_path / "run")
    # the caller's model as it was
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    out = check_compact(result.model).state_dict()
    assert 0 < result.info["overlap"] < 1  # the search swapped some weights in
    for name in masked_layers(model)[0]:
        w, old = out[f"{name}.weight"], before[f"{name}.weight"]
        assert torch.equal(w[w != 0], old[w != 0])  # kept weights unchanged, the others exactly zero
    bn_affine = [k for k in before if k.endswith(("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"))]
    assert bn_affine and all(torch.equal(out[k], before[k]) for k in bn_affine)
    assert torch.equal(out["fc.weight"], before["fc.weight"])
    assert not torch.equal(out["bn1.running_mean"], before["bn1.running_mean"])
    assert result.nonzero_params < 0.2 * result.params
    assert result.info["sparse_file"]["bytes"] < result.info["sparse_file"]["dense_float32_bytes"] / 3
    restored = load_sparse(tmp_path / "run" / "model.sparse.npz")
    assert restored.keys() == out.keys() and all(torch.equal(restored[k], out[k]) for k in out)


def test_the_sparse_file_round_trips_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * (torch.rand(16, 8, 3, 3, generator=g) > 0.9)
    state = {"a.weight": w, "a.bias": torch.randn(16), "bn.num_batches_tracked": torch.tensor(7),
             "dense": torch.randn(4, 4), "empty": torch.zeros(2, 3)}  # fmt: skip
    sizes = save_sparse(state, tmp_path / "w.npz")
    back = load_sparse(tmp_path / "w.npz")
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)
    assert sizes["nonzero"] == int((w != 0).sum()) + 16 and sizes["dense_float32_bytes"] == 4 * sum(
        v.numel() for v in state.values()
    )
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable sparse weights file"):
        load_sparse(tmp_path / "bad.npz")


def test_bad_requests_are_errors_before_any_work():
    for sparsity in (0.0, 1.0, -0.5):
        with pytest.raises(PruningError, match=r"\(0, 1\)"):
            jackpot_prune(plain_model(), SIZE, sparsity)
    with pytest.raises(PruningError, match="score init"):
        jackpot_prune(plain_model(), SIZE, 0.5, init="popup")


def _tiny_args():
    return [a for o in TINY for a in ("--set", o)]


def test_cli_prune_jackpot_writes_the_masked_network(tmp_path):
    run = tmp_path / "run"
    rc, out, err = cli("prune", "jackpot", "--set", "prune.sparsity=0.9", "--set", "prune.tune_epochs=0.25",
                       *_tiny_args(), "--out", run)  # fmt: skip
    assert rc == 0, err
    result = json.loads((run / "final_eval.json").read_text())
    assert result["method"] == "jackpot" and 0 <= result["info"]["overlap"] <= 1
    assert result["info"]["search_epochs"] == 0.25 and result["info"]["tune_epochs"] == 0.25
    assert (run / "base").is_dir() and (run / "train").is_dir() and (run / "finetune").is_dir()
    assert (run / "model.sparse.npz").is_file() and result["nonzero_params"] < 0.2 * result["params"]
    model = torch.load(run / "model.pt", weights_only=False)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["prune.sparsity=0"], "(0, 1)"),
        (["prune.sparsity=1"], "prune.sparsity"),
        (["prune.score_init=popup"], "score_init"),
        (["prune.tune_epochs=0.5"], "tune_epochs"),
    ],
)
def test_cli_prune_jackpot_refuses_bad_settings_in_one_line(tmp_path, sets, needle):
    argv = [a for s in sets for a in ("--set", s)]
    one_line_error(cli("prune", "jackpot", *_tiny_args(), *argv, "--out", tmp_path / "run"), needle)
    assert not (tmp_path / "run" / "base").exists()


def test_a_killed_and_resumed_search_ends_identical(tmp_path):
    """Saved after 3 of 8 steps, resumed in a fresh trainer: bitwise the uninterrupted search
    (scores, masks and BN statistics travel with the checkpoint)."""
    cfg = search_config(load_config(None, [*TINY, "train.epochs=2"]))

    def make(run_dir):
        return JackpotTrainer(attach_masks(plain_model(), 0.9)[0], cfg, run_dir)

    whole = make(tmp_path / "whole")
    whole.fit()
    killed = make(tmp_path / "killed")
    killed.on_epoch_start(0)
    for x, y in itertools.islice(killed.train_loader.epoch_batches(0), 3):
        killed.train_step(x, y)
    killed.save()
    resumed = make(tmp_path / "killed")
    assert resumed.resume() and resumed.step == 3
    resumed.fit()
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    found, magnitude = searched_masks(resumed.model), attach_masks(plain_model(), 0.9)[1]
    assert any(not torch.equal(found[n], magnitude[n]) for n in magnitude)  # the search did move the mask
