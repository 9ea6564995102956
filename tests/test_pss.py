"""PSS-Net: the prioritized sampler, its pools in checkpoints, the budget table and ``select``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dynaslice.budget import STATS_PREFIX, BudgetEntry, BudgetNet, BudgetTable
from dynaslice.cli import main
from dynaslice.models import create_supernet
from dynaslice.space import Arch, Dim, SearchSpace
from dynaslice.train import SupernetTrainer, load_config
from dynaslice.train.checkpoint import latest_checkpoint, load_state
from dynaslice.train.pss import PSSSampler, exp_schedule

torch.set_num_threads(1)

SPACE = SearchSpace((Dim("a", (1, 2, 3, 4)), Dim("b", (1, 2, 3, 4, 5)), Dim("c", (2, 4, 6))))


def metric(archs):
    """A toy resource: a + b + c (vectorised like ResourceModel.macs)."""
    return np.array([a["a"] + a["b"] + a["c"] for a in archs], dtype=float)


def sampler(**kw) -> PSSSampler:
    args = dict(bucket_step=2.0, total_steps=100, pool_size=3, seed=7, estimate_samples=2000)
    args.update(kw)
    return PSSSampler(SPACE, metric, **args)


def run_steps(s: PSSSampler, steps: range) -> list[list[Arch]]:
    """Sample and feed back a deterministic fake loss (a function of the arch)."""
    out = []
    for step in steps:
        archs = s.sample(step)
        out.append(archs)
        for a in archs:
            s.observe(a, 0.1 * a["a"] + 0.01 * a["b"] + 0.001 * step)
    return out


def test_sample_is_a_function_of_seed_and_step():
    a, b = sampler(), sampler()
    assert run_steps(a, range(30)) == run_steps(b, range(30))
    first = a.sample(30)
    assert a.sample(30) == first  # sampling does not change the state
    assert first[0] == SPACE.largest() and first[-1] == SPACE.smallest() and len(first) == 3
    c = sampler(seed=8)
    assert run_steps(c, range(30)) != run_steps(sampler(), range(30))


def test_new_subnets_land_in_the_requested_bucket():
    s = sampler()
    rng = np.random.default_rng(0)
    assert s.buckets == sorted(s.buckets) and len(s.buckets) >= 4
    for b in s.buckets:
        for _ in range(5):
            arch = s.sample_in_bucket(b, rng)
            assert s.bucket_of(arch) == b
            assert arch not in (SPACE.largest(), SPACE.smallest())
            assert round(metric([arch])[0] / 2.0) == b
    with pytest.raises(ValueError, match="unreachable"):
        s.sample_in_bucket(1000, rng)


def test_pool_capacity_evicts_the_lowest_score_and_scores_are_ema():
    s = sampler(pool_size=2)
    rng = np.random.default_rng(1)
    b = s.buckets[len(s.buckets) // 2]
    archs = []
    while len(archs) < 3:
        a = s.sample_in_bucket(b, rng)
        if a not in archs:
            archs.append(a)
    s.observe(archs[0], 1.0)  # score -1.0
    s.observe(archs[1], 3.0)  # score -3.0 (lowest)
    s.observe(archs[0], 2.0)  # EMA: 0.9 * -1 + 0.1 * -2
    assert s.pools[b][0][1] == pytest.approx(-1.1)
    s.observe(archs[2], 2.0)  # over capacity: evict archs[1]
    assert [a for a, _ in s.pools[b]] == [archs[0], archs[2]]
    s.observe(SPACE.largest(), 0.0)  # the largest and smallest are not pool members
    assert sum(len(p) for p in s.pools.values()) == 2


def test_schedules_decay_from_one_to_a_hundredth():
    s = sampler(total_steps=50)
    assert s.p_e(0) == pytest.approx(1.0) and s.t_e(0) == pytest.approx(1.0)
    assert s.p_e(49) == pytest.approx(0.01) and s.t_e(49) == pytest.approx(0.01)
    assert exp_schedule(25, 51, 1.0, 0.01) == pytest.approx(0.1)
    assert s.p_e(10) > s.p_e(20) > s.p_e(30)


def test_full_pool_is_sampled_by_score_when_exploiting():
    s = sampler(pool_size=2, p_e=(1e-9, 1e-9), t_e=(1e-3, 1e-3))
    rng = np.random.default_rng(2)
    for b in s.buckets:  # fill every pool: a good and a bad subnet
        seen = []
        for _ in range(200):
            a = s.sample_in_bucket(b, rng)
            if a not in seen:
                seen.append(a)
            if len(seen) == 2:
                break
        for a, loss in zip(seen, (0.5, 5.0), strict=False):
            s.observe(a, loss)
    full = {b for b, p in s.pools.items() if len(p) == 2}
    best = {b: max(s.pools[b], key=lambda e: e[1])[0] for b in full}
    for step in range(20):
        mid = s.sample(step)[1]
        if s.bucket_of(mid) in full:
            assert mid == best[s.bucket_of(mid)]


def test_state_dict_round_trip_gives_identical_subsequent_samples():
    a = sampler()
    run_steps(a, range(40))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = sampler()
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    assert run_steps(a, range(40, 70)) == run_steps(b, range(40, 70))
    with pytest.raises(ValueError, match="does not belong"):
        sampler(pool_size=4).load_state_dict(state)


# --------------------------------------------------------------------------- budget table


def table() -> BudgetTable:
    a = lambda v: Arch(a=v, b=1, c=2)  # noqa: E731
    return BudgetTable(
        [
            BudgetEntry(10, a(1), 10_000_000, 80.0, latency_ms=1.0),
            BudgetEntry(20, a(2), 20_000_000, 85.0, latency_ms=2.0),
            BudgetEntry(30, a(3), 30_000_000, 84.0, latency_ms=3.0),
        ]
    )


def test_budget_table_best_within_budget(tmp_path):
    t = table()
    assert t.best(max_macs=25e6)["a"] == 2
    assert t.best(max_macs=40e6)["a"] == 2  # the most accurate, not the largest
    assert t.best(max_macs=15e6)["a"] == 1
    assert t.best(max_latency_ms=1.5)["a"] == 1
    assert t.best(max_macs=40e6, max_latency_ms=1.0)["a"] == 1
    with pytest.raises(ValueError, match="cheapest needs 10 MMACs"):
        t.best(max_macs=5e6)
    t.save(tmp_path / "t.json")
    assert BudgetTable.load(tmp_path / "t.json").entries == t.entries


def test_bucket_labels_say_the_range_a_bucket_holds(tmp_path, capsys):
    """A bucket is the metric rounded to a multiple of bucket_step: its label is a range around
    that value, not an upper bound (issue 33: "bucket 12" held 12.3 MMACs)."""
    t = table()
    t.meta = {"metric": "macs", "bucket_step": 2.5}
    t.entries[1] = BudgetEntry(12.5, Arch(a=2, b=1, c=2), 13_100_000, 85.0)
    assert t.bucket_label(t.entries[1]) == "11.25-13.75 MMACs"
    assert "| 11.25-13.75 MMACs | 13.10 |" in t.format()
    t.save(tmp_path / "budget_table.json")
    assert main(["select", str(tmp_path / "budget_table.json"), "--max-macs", "14M"]) == 0
    assert capsys.readouterr().out.startswith("bucket 11.25-13.75 MMACs: 13.10 MMACs")
    t.meta = {"metric": "latency", "bucket_step": 0.5}
    assert t.bucket_label(t.entries[0]) == "9.75-10.25 ms"


def test_a_bucket_step_giving_fewer_than_three_buckets_is_refused():
    """The README's latency line kept bucket_step 2.5 (meant for MMACs) for milliseconds and got
    a table of 2 budgets without a word; the toy metric spans 4..15 here."""
    with pytest.raises(ValueError, match=r"gives 2 budget bucket\(s\) over this space's 4..15.*at least 3"):
        sampler(bucket_step=6.0)
    assert len(sampler(bucket_step=3.0).buckets) >= 3


# --------------------------------------------------------------------------- end to end

TINY = {
    "model": {"kwargs": {"ratios": [0.5, 0.75, 1.0]}},
    "data": {"name": "synthetic", "image_size": 8, "batch_size": 8, "val_size": 24, "synthetic_train": 88},
    "optim": {"lr": 0.05},
    "train": {
        "epochs": 1,
        "threads": 1,
        "sampler": "pss",
        "target": "inplace",
        "num_subnets": 3,
        "eval_every_epochs": 0,
        "eval_widths": [1.0],
        "recal_images": 32,
        "recal_batch_size": 16,
        "ckpt_every_steps": 4,
        "log_every_steps": 1,
        "pss": {"bucket_step": 0.1, "pool_size": 4, "select_top_k": 2, "estimate_samples": 500},
    },
}


def test_train_with_pss_writes_a_budget_table_selected_on_val(tmp_path, capsys):
    cfg_path = tmp_path / "pss.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(cfg_path), "--out", str(run)]) == 0
    data = json.loads((run / "budget_table.json").read_text())
    assert data["split"] == "val" and data["metric"] == "macs"
    t = BudgetTable.load(run)
    assert t.entries and BudgetTable.load(run / "budget.safetensors").entries == t.entries
    net = create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=8, ratios=[0.5, 0.75, 1.0])
    for e in t.entries:
        net.space.validate(e.arch)
        assert abs(e.macs / 1e6 - e.bucket) <= 0.05 + 1e-9  # the subnet is in its bucket
        # accuracies are over the 24 validation images (the test split has 256)
        assert abs(e.val_accuracy * 24 / 100 - round(e.val_accuracy * 24 / 100)) < 1e-6
    # the pools are in the checkpoint, and a resumed trainer gets them back
    state = load_state(latest_checkpoint(run) / "state.pt")["extra"]["sampler"]
    assert state["kind"] == "pss" and sum(len(p) for p in state["pools"].values()) > 0
    trainer = SupernetTrainer(load_config(run / "config.yaml"), run)
    assert trainer.resume()
    assert trainer.sampler.state_dict() == state
    # killed during the end-of-run selection (no budget.safetensors, no final_eval.json yet):
    # resume redoes it
    (run / "budget.safetensors").unlink()
    (run / "final_eval.json").unlink()
    assert main(["train", str(cfg_path), "--out", str(run), "--resume"]) == 0
    assert BudgetTable.load(run / "budget.safetensors").entries == t.entries
    capsys.readouterr()

    # select: in budget, with export; impossible budget exits 2
    smallest = min(e.macs for e in t.entries)
    assert main(["select", str(run), "--max-macs", str(smallest), "--export", str(tmp_path / "s.pt")]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[1]) == min(t.entries, key=lambda e: e.macs).arch.to_dict()
    model = torch.load(tmp_path / "s.pt", weights_only=False).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # the exported model is the table entry as BudgetNet runs it
        assert torch.allclose(model(x), BudgetNet.load(run).eval()(x, max_macs=smallest), atol=1e-5)
    assert main(["select", str(run), "--max-macs", str(smallest - 1)]) == 2
    assert "cheapest needs" in capsys.readouterr().err
    assert main(["select", str(run), "--max-latency-ms", "5"]) == 2  # no latency table given
    assert main(["select", str(tmp_path / "nope"), "--max-macs", "1M"]) == 2


def test_pss_config_errors(tmp_path):
    cfg_path = tmp_path / "pss.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    assert (
        main(["train", str(cfg_path), "--set", "train.pss.metric=latency", "--out", str(tmp_path / "x")]) == 2
    )
    assert (
        main(["train", str(cfg_path), "--set", "train.pss.bucket_stepp=1", "--out", str(tmp_path / "x")]) == 2
    )
    assert not Path(tmp_path / "x").exists()


def test_latency_metric_buckets_and_budget_table_latencies(tmp_path):
    from dynaslice.latency import build_latency_table
    from dynaslice.train.data import eval_loader, load_split
    from dynaslice.train.pss import make_pss_sampler, select_budget_table

    net = create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=8, ratios=[0.5, 0.75, 1.0])
    lat = build_latency_table(net, repeats=1, warmup=0, max_values=2, calibration=2, progress=False)
    lat.save(tmp_path / "lat.json")
    cfg_path = tmp_path / "pss.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    sets = ["train.pss.metric=latency", f"train.pss.latency_table={tmp_path / 'lat.json'}"]
    cfg = load_config(cfg_path, sets + ["train.pss.bucket_step=0.02", "train.pss.estimate_samples=300"])
    s = make_pss_sampler(net, cfg.train, 10)
    rng = np.random.default_rng(0)
    picks = {}
    for b in s.buckets[:2]:
        arch = s.sample_in_bucket(b, rng)
        assert round(lat.predict(arch) / 0.02) == b
        picks[s.bucket_value(b)] = [arch]
    train_ds = load_split(cfg.data, "train", 0)
    val = eval_loader(load_split(cfg.data, "val", 0))
    table, _ = select_budget_table(net, picks, train_ds, val, cfg.train, str(tmp_path / "lat.json"))
    for e in table.entries:
        assert e.latency_ms == pytest.approx(lat.predict(e.arch))
    cheapest = min(table.entries, key=lambda e: e.latency_ms)
    assert table.best(max_latency_ms=cheapest.latency_ms) == cheapest.arch


def test_budget_net_runs_each_entry_with_the_bn_statistics_it_was_selected_with(tmp_path):
    """Each entry keeps BN statistics recalibrated for it alone: running it through BudgetNet
    reproduces its validation accuracy exactly, whatever entry ran before it, and its extracted
    static model computes the same outputs."""
    from dynaslice.modelfile import load_model_file, save_model_file
    from dynaslice.train.data import eval_loader, load_split
    from dynaslice.train.evaluate import evaluate
    from dynaslice.train.pss import select_budget_table

    def accuracy(net, arch, batches):
        return evaluate(net, {"a": arch}, batches)[0]["accuracy"]

    cfg_path = tmp_path / "pss.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    cfg = load_config(cfg_path)
    kwargs = {"in_chans": 1, "num_classes": 10, "input_size": 8, "ratios": [0.5, 0.75, 1.0]}
    net = create_supernet("resnet_small", **kwargs)
    # two non-uniform subnets of different buckets with the same stage-2 width after different
    # stage-1 widths: with statistics per layer width they would share (average) stage 2's BN rows
    a = net.space.validate({"s1": 16, "s2": 16, "s3": 32, "s4": 64})
    b = net.space.validate({"s1": 8, "s2": 16, "s3": 64, "s4": 128})
    val = eval_loader(load_split(cfg.data, "val", 0))
    train_ds = load_split(cfg.data, "train", 0)
    table, stats = select_budget_table(net, {1.0: [a], 2.0: [b]}, train_ds, val, cfg.train)
    assert [e.arch for e in table.entries] == [a, b] and len(stats) == 2
    budget = BudgetNet(net, table, stats).eval()
    ea, eb = table.entries
    for e in (ea, eb, ea):  # switching back and forth: each call gets its own entry's statistics
        assert accuracy(budget.net, budget.use(e), val) == pytest.approx(e.val_accuracy)
    # the shared stage-2 width got different statistics in the two entries
    shared = [k for k in stats[0] if k.startswith("layer2.0.bn1.") and "mean" in k]
    assert shared and not torch.equal(stats[0][shared[0]], stats[1][shared[0]])
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y_a = budget.net(x, budget.use(ea))
        budget.net(x, budget.use(eb))
        assert torch.equal(budget.net(x, budget.use(ea)), y_a)
        chosen = budget.entry(max_macs=eb.macs)  # the most accurate within the budget
        y = budget.net(x, budget.use(chosen))
        budget.net(x, budget.use(eb if chosen == ea else ea))
        assert torch.equal(budget(x, max_macs=eb.macs), y)
        assert torch.allclose(budget.extract(max_macs=ea.macs).eval()(x), y_a, atol=1e-5)

    # the file round trip, and the errors
    from dynaslice.budget import save_budget_file
    from dynaslice.modelfile import CheckpointError

    save_budget_file(
        tmp_path / "b.safetensors", net, table, stats, {"model": {"name": "resnet_small", "kwargs": kwargs}}
    )
    loaded = BudgetNet.load(tmp_path / "b.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, max_macs=ea.macs), y_a)
    tensors, meta = load_model_file(tmp_path / "b.safetensors")
    save_model_file(
        tmp_path / "old.safetensors",
        {k: v for k, v in tensors.items() if not k.startswith(STATS_PREFIX + ".")},
        meta,
    )
    with pytest.raises(CheckpointError, match="no BN statistics per budget entry"):
        BudgetNet.load(tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match="1 sets of BN statistics for 2 table entries"):
        BudgetNet(net, table, stats[:1])
