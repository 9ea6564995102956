"""Serving an elastic language model (issue 32, items 3 and 5): decoding with a KV cache gives
the logits of the whole sequence at once; self-speculative decoding gives the largest's greedy
output; a request's budget picks the table's slice; the Mix'n'Match search returns a Pareto set
written as a budget table in PSS's format. Tiny random Llama / GPT-2 models, seconds."""

from __future__ import annotations

import json
import time

import pytest
import torch
import transformers as hf

import dynaslice as ds
from dynaslice.budget import BudgetTable
from dynaslice.lm.search import (
    Candidate,
    budget_table,
    canonical,
    check_decode_table,
    decode_latency_table,
    pareto,
    score_slice,
    search,
)
from dynaslice.lm.serve import ElasticLM
from dynaslice.lm.supernet import KVCache

VOCAB = 96


def _llama(layers: int = 3):  # grouped-query attention: 4 query heads share 2 KV heads
    cfg = hf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return hf.LlamaForCausalLM(cfg).eval()


def _gpt2():
    cfg = hf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return hf.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {"llama": ds.make_supernet(_llama(), ratios=[0.5, 1.0]).eval(),
            "gpt2": ds.make_supernet(_gpt2(), ratios=[0.5, 1.0]).eval()}  # fmt: skip


def _ids(n: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _mixed(net):
    """A Mix'n'Match slice: per-layer widths and heads differ."""
    narrow = net.space["layers.0.ffn"].min
    return net.space.validate({**net.space.largest().to_dict(), "layers.0.ffn": narrow, "layers.0.heads": 2,
                               "layers.1.heads": 1})  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoding_with_a_cache_gives_the_logits_of_the_whole_sequence(nets, family) -> None:
    net = nets[family]
    ids = _ids(14)
    for arch in (net.space.largest(), _mixed(net), net.space.smallest()):
        with torch.no_grad():
            whole = net(ids, arch)
            cache = KVCache(arch)
            # a prompt, one token at a time, then several new tokens at once (a verification)
            parts = [net.forward_cached(ids[:, :6], arch, cache)]
            parts += [net.forward_cached(ids[:, t : t + 1], arch, cache) for t in range(6, 9)]
            parts.append(net.forward_cached(ids[:, 9:], arch, cache))
        assert cache.length == 14
        got = torch.cat(parts, dim=1)
        assert torch.allclose(got, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))


def test_a_cache_serves_its_own_slice_only(nets) -> None:
    net = nets["llama"]
    cache = KVCache(net.space.largest())
    with torch.no_grad():
        net.forward_cached(_ids(4), net.space.largest(), cache)
        with pytest.raises(ValueError, match="another subnet"):
            net.forward_cached(_ids(1), net.space.smallest(), cache)
    cache.truncate(2)
    assert cache.length == 2 and all(k.shape[2] == 2 for k, _ in cache.layers.values())
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(3)
    bert = ds.make_supernet(hf.BertModel(hf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2)))  # fmt: skip
    with pytest.raises(ValueError, match="encoder"):
        bert.forward_cached(_ids(3), bert.space.largest(), KVCache(bert.space.largest()))


def _table(net) -> list[dict]:
    """A hand-made table: three slices with their costs and perplexities."""
    small, mid, large = net.space.smallest(), _mixed(net), net.space.largest()
    rows = [(small, 100, 10, 1.0, 30.0), (mid, 300, 30, 2.0, 20.0), (large, 500, 50, 3.0, 10.0)]
    return [{"arch": a.to_dict(), "params": p, "macs": m, "latency_ms": ms, "val_perplexity": ppl,
             "val_accuracy": 0.0, "bucket": ms} for a, p, m, ms, ppl in rows]  # fmt: skip


def test_a_request_budget_picks_the_best_slice_within_it(nets) -> None:
    net = nets["llama"]
    lm = ElasticLM(net, _table(net))
    assert lm.arch() == net.space.largest()
    assert lm.arch(max_params=350) == _mixed(net)
    assert lm.arch(max_macs=10) == net.space.smallest()
    assert lm.arch(max_latency_ms=2.5) == _mixed(net)
    assert lm.arch(max_params=350, max_latency_ms=1.5) == net.space.smallest()  # every limit holds
    with pytest.raises(ValueError, match="smallest has 100"):
        lm.arch(max_params=50)
    with pytest.raises(ValueError, match="no subnet of the budget table fits"):
        lm.arch(max_latency_ms=0.5)
    with pytest.raises(ValueError, match="not both"):
        lm.generate(_ids(3, batch=1), 2, arch=net.space.largest(), max_params=350)
    # the request's slice is the one that decodes: the same tokens as that arch asked by name
    prompt = _ids(5, batch=1)
    assert torch.equal(lm.generate(prompt, 6, max_params=350), lm.generate(prompt, 6, arch=_mixed(net)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generation_with_the_cache_is_greedy_generation(nets, family) -> None:
    net = nets[family]
    lm = ElasticLM(net, _table(net))
    prompt = _ids(5, batch=1, seed=3)
    out = lm.generate(prompt, 12, arch=_mixed(net))
    seq = prompt
    with torch.no_grad():
        for _ in range(12):  # no cache: the whole sequence every step
            seq = torch.cat([seq, net(seq, _mixed(net))[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_speculative_decoding_outputs_the_largests_greedy_tokens(nets, family) -> None:
    net = nets[family]
    lm = ElasticLM(net, _table(net))
    for seed, prompt_len in ((1, 1), (2, 6)):
        prompt = _ids(prompt_len, batch=1, seed=seed)
        want = lm.generate(prompt, 20)
        drafts = (
            net.space.smallest(),
            _mixed(net),
            net.space.largest().replace(depth=1),
            net.space.largest(),
        )
        for draft in drafts:
            for k in (1, 3, 5):
                out, stats = lm.speculative(prompt, 20, draft=draft, k=k)
                assert torch.equal(out, want), (draft, k)
                assert stats.rounds <= 20 and stats.accepted <= stats.drafted
    _, stats = lm.speculative(prompt, 20, draft=net.space.largest(), k=4)
    assert stats.acceptance == 1.0 and stats.rounds == 4  # a draft that is the largest: 5 tokens a round
    with pytest.raises(ValueError, match="k >= 1"):
        lm.speculative(prompt, 4, draft=net.space.smallest(), k=0)
    with pytest.raises(ValueError, match="one prompt"):
        lm.generate(_ids(3, batch=2), 2)
    with pytest.raises(ValueError, match="new_tokens"):
        lm.speculative(prompt, -1, draft=net.space.smallest())


def test_pareto_keeps_the_undominated() -> None:
    a = ds.Arch(x=1)
    cands = [Candidate(a, 1.0, 30.0, 0), Candidate(a, 2.0, 20.0, 0), Candidate(a, 2.5, 25.0, 0),
             Candidate(a, 3.0, 20.0, 0), Candidate(a, 4.0, 10.0, 0)]  # fmt: skip
    assert [(c.latency_ms, c.val_perplexity) for c in pareto(cands)] == [
        (1.0, 30.0),
        (2.0, 20.0),
        (4.0, 10.0),
    ]


def test_search_writes_a_pareto_budget_table_that_serves(nets, tmp_path) -> None:
    net = nets["llama"]
    table = decode_latency_table(net, context=8, repeats=2, warmup=1, clock=time.thread_time)
    # a block per layer, over its FFN width and heads; a layer past the depth costs nothing
    assert [b.name for b in table.blocks] == [f"layers.{i}" for i in range(net.n_stages)]
    assert table.blocks[1].predict(net.space.largest().replace(depth=1)) == 0.0
    one = net.space.largest().replace(depth=1)
    assert table.predict(one) < table.predict(net.space.largest())
    assert table.meta["context"] == 8 and table.meta["clock"] == "thread_time"  # CPU time on a busy core
    check = check_decode_table(table, net, n=2, repeats=2, archs=[net.space.largest()])
    assert len(check["archs"]) == 3 and all(
        r["measured_ms"] > 0 and r["refit_ms"] > 0 for r in check["archs"]
    )
    assert set(check["refit"]) == {"median_abs_pct_error", "max_abs_pct_error"}

    val = [_ids(12, seed=7)]
    front, seen = search(net, table, val, samples=6, rounds=2, children=4, align=16)
    assert {c.arch for c in front} <= {c.arch for c in seen}
    for c in front:  # no evaluated slice beats a front member on both latency and perplexity
        assert not any(o.latency_ms <= c.latency_ms and o.val_perplexity < c.val_perplexity for o in seen)
        assert all(c.arch[f"layers.{i}.ffn"] % 16 == 0 for i in range(net.n_stages))
        assert c.arch == canonical(net, c.arch)
    lat = [c.latency_ms for c in front]
    assert lat == sorted(lat)
    assert abs(front[-1].val_perplexity - score_slice(net, front[-1].arch, val)[0]) < 1e-9

    written = budget_table(net, front, table, repeats=2, candidates=len(seen))
    path = tmp_path / "budget_table.json"  # where a run keeps its table
    path.write_text(json.dumps(written))
    entries = written["entries"]
    assert entries and [e["latency_ms"] for e in entries] == sorted(e["latency_ms"] for e in entries)
    ppl = [e["val_perplexity"] for e in entries]
    assert ppl == sorted(ppl, reverse=True)  # Pareto on measured latency: slower means better
    assert len(BudgetTable.load(path).entries) == len(entries)  # PSS's reader takes it
    lm = ElasticLM(net, tmp_path)  # the run directory
    assert lm.arch(max_latency_ms=entries[0]["latency_ms"]) == net.space.validate(entries[0]["arch"])
    (tmp_path / "other.json").write_text(json.dumps({"entries": []}))
    with pytest.raises(ValueError, match="not a dynaslice budget table"):
        ElasticLM(net, tmp_path / "other.json")
