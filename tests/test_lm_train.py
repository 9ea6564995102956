"""Nested training of language-model supernets (issue 32 item 2) and ``export --format hf`` (item 4).

A tiny Llama (2 layers, hidden 32) on a synthetic corpus of a few hundred short documents in
fortune's format, written into a temporary folder: never Debian's package, seconds per run.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as hf
import yaml
from test_reliability import cli, one_line_error

from dynaslice import runs
from dynaslice.lm.data import BlockBatches, decode, encode, load_text_split, read_documents, split_of
from dynaslice.lm.train import LMTrainer, load_lm_run, perplexity
from dynaslice.modelfile import load_model_file
from dynaslice.train.config import load_config

WORDS = "the cat sat on a mat and dog ran far away while birds sing over hills of green".split()
TINY = {
    "model": {"name": "hf:llama", "kwargs": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 32, "ratios": [0.25, 0.5, 1.0], "heads": [4]}},
    "data": {"name": "text", "seq_len": 16, "batch_size": 8, "train_size": 96},
    "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
    "train": {"epochs": 1, "threads": 1, "target": "inplace", "num_subnets": 3, "eval_widths": [0.25, 0.5, 1.0],
              "label_smoothing": 0.0, "ckpt_every_steps": 4, "keep_checkpoints": 5, "log_every_steps": 1},
}  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for name in ("one", "two"):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) for _ in range(150)]
        (folder / name).write_text("\n%\n".join(docs) + "\n%\n")
    (folder / "one.dat").write_bytes(b"\x00\x01strfile index")  # skipped, as Debian's are
    return folder


def write(folder: Path, corpus: Path, name: str = "lm.yaml", **sections: dict) -> Path:
    data = {k: dict(v) for k, v in TINY.items()}
    data["data"]["root"] = str(corpus)
    for key, values in sections.items():
        data[key] = {**data[key], **values}
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A nested run (in-place distillation over x1, x0.5, x0.25), trained once by the CLI."""
    folder = tmp_path_factory.mktemp("run")
    rc, out, err = cli("train", write(folder, corpus), "--out", folder / "run")
    assert rc == 0, err
    return folder / "run"


def test_bytes_documents_and_splits(corpus) -> None:
    assert decode(encode("héllo %")) == "héllo %" and encode("a").tolist() == [97]
    docs = read_documents(corpus)
    assert len(docs) == 300 and all(b"%" not in d for d in docs)  # the .dat index is not read
    splits = {s: load_text_split(corpus, s, 16) for s in ("train", "val", "test")}
    assert {split_of(d) for d in docs} == {"train", "val", "test"}
    assert sum(s.documents for s in splits.values()) == 300
    train = splits["train"]
    assert train.blocks.shape[1] == 17 and torch.equal(
        train.blocks[0, -1], train.blocks[1, 0]
    )  # overlap by one
    batches = BlockBatches(train, 8, seed=0, train_size=40)
    x, y = next(batches.epoch_batches(0))
    assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    fewer = BlockBatches(
        train, 8, seed=0, train_size=16
    )  # a shorter run trains on a prefix of the same blocks
    assert {tuple(b.tolist()) for b in fewer.blocks} <= {tuple(b.tolist()) for b in batches.blocks}
    again = list(batches.epoch_batches(1))  # the same batches for the same epoch; a resume starts mid-epoch
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again[2:], batches.epoch_batches(1, 2), strict=True))
    assert not torch.equal(again[0][0], next(batches.epoch_batches(0))[0])


def test_nested_training_lowers_every_width_and_writes_perplexities(trained) -> None:
    result = json.loads((trained / runs.FINAL_EVAL).read_text())
    names = [r["name"] for r in result["subnets"]]
    assert names == ["x1", "x0.5", "x0.25"]
    assert result["train_tokens"] == 12 * 8 * 16 and result["steps"] == 12
    metrics = [json.loads(line) for line in (trained / runs.METRICS).read_text().splitlines()]
    steps = [m for m in metrics if "losses" in m]
    assert steps[0]["subnets"] == names  # every granularity every step, largest first
    net, _, cfg, _ = load_lm_run(trained)
    fresh = LMTrainer(load_config(trained / runs.CONFIG, ["train.init_from=null"]), trained.parent / "fresh")
    val = load_text_split(cfg.data.root, "val", cfg.data.seq_len)
    for row in result["subnets"]:
        arch = row["arch"]
        assert row["val_ppl"] == pytest.approx(perplexity(net, arch, val)["ppl"], rel=1e-6)
        assert row["val_ppl"] < perplexity(fresh.net, arch, val)["ppl"]  # training lowered each width's loss


def test_perplexity_is_exp_of_mean_token_nll(trained) -> None:
    net, _, cfg, _ = load_lm_run(trained)
    val = load_text_split(cfg.data.root, "val", cfg.data.seq_len)
    arch = net.space.uniform(0.5)
    got = perplexity(net, arch, val, batch_size=5)
    x, y = val.blocks[:, :-1], val.blocks[:, 1:]
    with torch.no_grad():
        nll = F.cross_entropy(net(x, arch).flatten(0, 1), y.flatten())
    assert got["tokens"] == y.numel() and got["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_resume_continues_bit_for_bit(tmp_path, trained) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for path in runs.checkpoint_steps(run)[-2:]:  # interrupted after step 4: its last checkpoints lost
        shutil.rmtree(path)
    (run / runs.FINAL_EVAL).unlink()
    rc, _, err = cli("train", run / runs.CONFIG, "--out", run, "--resume")
    assert rc == 0, err
    got, want = (json.loads((r / runs.FINAL_EVAL).read_text()) for r in (run, trained))
    assert (
        got.pop("train_seconds") > 0 and want.pop("train_seconds") > 0
    )  # wall-clock, the one thing that differs
    assert got == want
    want, _ = load_model_file(runs.checkpoint_steps(trained)[-1] / runs.MODEL_FILE)
    got, _ = load_model_file(runs.checkpoint_steps(run)[-1] / runs.MODEL_FILE)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_nested_run_starts_from_a_trained_model_with_sorted_units(tmp_path, corpus, trained) -> None:
    source = json.loads((trained / runs.FINAL_EVAL).read_text())["subnets"][0]
    cfg = load_config(write(tmp_path, corpus), [f"train.init_from={trained}", "train.order_channels=true"])
    trainer = LMTrainer(cfg, tmp_path / "nested")
    assert trainer.evaluate_validation()[0]["val_ppl"] == pytest.approx(source["val_ppl"], rel=1e-5)


def test_alone_trains_one_width_on_the_labels(tmp_path, corpus) -> None:
    cfg = load_config(
        write(tmp_path, corpus), ["train.sampler=fixed", "train.fixed_width=0.5", "train.target=labels"]
    )
    trainer = LMTrainer(cfg, tmp_path / "alone")
    assert list(trainer.archs) == ["x0.5"] and trainer.step_archs(7) == [trainer.net.space.uniform(0.5)]


def test_export_hf_round_trip_equals_the_slice(tmp_path, trained) -> None:
    rc, out, err = cli("export", trained, "--format", "hf", "--arch", "x0.5", "--out", tmp_path / "hf")
    assert rc == 0, err
    model = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    net, *_ = load_lm_run(trained)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = net(ids, net.space.uniform(0.5)), model(input_ids=ids).logits
    assert model.config.intermediate_size == 32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_mistakes_are_one_line(tmp_path, corpus, trained) -> None:
    one_line_error(cli("train", write(tmp_path, corpus, data={"name": "fashion_mnist"}), "--out", tmp_path / "a"),
                   "data.name: text")  # fmt: skip
    bad_field = write(tmp_path, corpus, model={"kwargs": {**TINY["model"]["kwargs"], "hiden_size": 8}})
    one_line_error(cli("train", bad_field, "--out", tmp_path / "b"), "hiden_size", "LlamaConfig")
    one_line_error(
        cli("train", write(tmp_path, corpus, train={"target": "ib"}), "--out", tmp_path / "c"), "train.target"
    )
    one_line_error(cli("train", write(tmp_path, corpus, train={"eval_widths": [0.1, 1.0]}), "--out", tmp_path / "d"),
                   "train.eval_widths")  # fmt: skip
    mixed = json.dumps(
        {"layers.0.ffn": 16, "layers.0.heads": 4, "layers.1.ffn": 64, "layers.1.heads": 4, "depth": 2}
    )
    one_line_error(
        cli("export", trained, "--format", "hf", "--arch", mixed, "--out", tmp_path / "e"),
        "per-layer FFN widths",
    )
    one_line_error(
        cli("export", trained, "--format", "hf", "--budget-macs", "1M", "--out", tmp_path / "f"),
        "no budget table",
    )
    assert not any((tmp_path / n).exists() for n in "abcdef")


def test_export_hf_by_budget_picks_the_lowest_perplexity_within_it(tmp_path, trained) -> None:
    net, *_ = load_lm_run(trained)
    half, whole = net.space.uniform(0.5), net.space.largest()
    entries = [  # dynaslice.lm.search's format (PSS's, plus params and val_perplexity)
        {"bucket": 1.0, "arch": half.to_dict(), "macs": 1000, "val_accuracy": 10.0, "latency_ms": 1.0,
         "val_perplexity": 9.0},
        {"bucket": 2.0, "arch": whole.to_dict(), "macs": 2000, "val_accuracy": 12.0, "latency_ms": 2.0,
         "val_perplexity": 8.0},
        # a Mix'n'Match slice, the best within 1.5 ms, which no Hugging Face config holds: passed over
        {"bucket": 1.2, "arch": {**half.to_dict(), "layers.0.ffn": whole["layers.0.ffn"]}, "macs": 1200,
         "val_accuracy": 11.0, "latency_ms": 1.2, "val_perplexity": 8.5},
    ]  # fmt: skip
    (trained / runs.BUDGET_TABLE).write_text(
        json.dumps({"format": "dynaslice-budget-table", "entries": entries})
    )
    try:
        rc, out, err = cli(
            "export", trained, "--format", "hf", "--budget-ms", "1.5", "--out", tmp_path / "hf"
        )
        assert rc == 0, err
        assert hf.AutoConfig.from_pretrained(tmp_path / "hf").intermediate_size == half["layers.0.ffn"]
        one_line_error(cli("export", trained, "--format", "hf", "--budget-ms", "0.5", "--out", tmp_path / "no"),
                       "cheapest needs")  # fmt: skip
    finally:
        (trained / runs.BUDGET_TABLE).unlink()
