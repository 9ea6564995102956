"""Hugging Face language models as supernets (issue 32, items 1 and 4): ``ds.make_supernet(hf_model)``
slices FFN widths, heads and depth of Llama (GQA), GPT-2 and BERT by weight prefixes; the largest
subnet is the model; ``dynaslice.lm.export_hf`` writes a slice that ``transformers`` alone loads
with the slice's outputs. Tiny models from configs (2 layers, hidden 64), random init, nothing
downloaded."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as hf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynaslice as ds
from dynaslice.lm import (
    LMSupernet,
    activation_importance,
    count_macs,
    count_params,
    export_hf,
    make_lm_supernet,
    reorder_by_importance,
)

VOCAB, TOKENS = 96, 10


def _llama() -> nn.Module:  # grouped-query attention: 4 query heads share 2 KV heads
    cfg = hf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return hf.LlamaForCausalLM(cfg).eval()


def _gpt2() -> nn.Module:
    cfg = hf.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return hf.GPT2LMHeadModel(cfg).eval()


def _bert() -> nn.Module:
    cfg = hf.BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return hf.BertModel(cfg).eval()


FAMILIES = {"llama": (_llama, hf.AutoModelForCausalLM), "gpt2": (_gpt2, hf.AutoModelForCausalLM),
            "bert": (_bert, hf.AutoModel)}  # fmt: skip


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[nn.Module, LMSupernet]]:
    torch.manual_seed(0)
    out = {}
    for name, (make, _) in FAMILIES.items():
        model = make()
        out[name] = (model, ds.make_supernet(model).eval())
    return out


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(seed))


def _out(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())))


def _one_line_error(kind: type[Exception], fn, *needles: str) -> str:
    with pytest.raises(kind) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


@pytest.mark.parametrize("family", list(FAMILIES))
def test_largest_subnet_is_the_model(built, family: str) -> None:
    model, net = built[family]
    assert isinstance(net, LMSupernet)
    layers = model.config.num_hidden_layers
    assert set(net.space.names) == {f"layers.{i}.{d}" for i in range(layers) for d in ("ffn", "heads")} | {
        "depth"
    }
    assert all(c % 8 == 0 for c in net.space["layers.0.ffn"].choices)  # MatFormer widths in multiples of 8
    ids = _ids()
    with torch.no_grad():
        assert _close(net(ids, net.space.largest()), _out(model(input_ids=ids)))
    assert count_params(net, net.space.largest()) == model.num_parameters()


def test_gqa_head_choices_keep_the_group_ratio(built) -> None:
    _, net = built["llama"]
    # query heads, 2 per KV head: whole groups, or one head of the first group with its KV head
    assert net.space["layers.0.heads"].choices == (1, 2, 4)
    model, _ = built["llama"]
    assert make_lm_supernet(model, heads=[2]).space["layers.0.heads"].choices == (2, 4)
    _, gpt2 = built["gpt2"]
    assert gpt2.space["layers.0.heads"].choices == (1, 2, 3, 4)


def _narrow(net: LMSupernet, heads: int, depth: int):
    ffn = net.space["layers.0.ffn"].min
    values = {f"layers.{i}.{d}": v for i in range(net.n_stages) for d, v in (("ffn", ffn), ("heads", heads))}
    return net.space.validate({**values, "depth": depth})


@pytest.mark.parametrize(
    "family,heads,depth", [("llama", 2, 2), ("llama", 1, 2), ("llama", 4, 1), ("gpt2", 4, 1), ("bert", 4, 2)]
)
def test_exported_slice_loads_with_transformers_and_equals_the_slice(
    built, tmp_path, family, heads, depth
) -> None:
    model, net = built[family]
    arch = _narrow(net, heads, depth)
    out = export_hf(net, arch, tmp_path / "slice")
    auto = FAMILIES[family][1]
    sub = auto.from_pretrained(out).eval()
    ids = _ids(1)
    with torch.no_grad():
        want = net(ids, arch)
        assert not _close(want, _out(model(input_ids=ids)))  # a real slice, not the model
        assert _close(_out(sub(input_ids=ids)), want)
    assert sub.config.num_hidden_layers == depth
    assert count_params(net, arch) == sub.num_parameters() < model.num_parameters()
    # MACs per token: torch's count of the exported model with eager attention (full T x T products)
    eager = auto.from_pretrained(out, attn_implementation="eager").eval()
    if family == "bert":
        eager.pooler = None  # once per sequence on its first token, not a per-token cost
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager(input_ids=ids[:1])
    assert counter.get_total_flops() // 2 == TOKENS * count_macs(net, arch, context=TOKENS)


def test_export_is_loaded_by_transformers_without_dynaslice(built, tmp_path) -> None:
    """A fresh process where dynaslice cannot be imported loads the checkpoint and gives the slice."""
    _, net = built["llama"]
    arch = _narrow(net, 2, 1)
    export_hf(net, arch, tmp_path / "slice")
    ids = _ids(2)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["dynaslice"] = None  # any import of dynaslice fails
        import torch, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "slice")!r}).eval()
        with torch.no_grad():
            torch.save(model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=120)
    with torch.no_grad():
        assert _close(torch.load(tmp_path / "out.pt"), net(ids, arch))


def _surgery(model: nn.Module, ffn: list[int], heads: list[int], depth: int) -> nn.Module:
    """The reference: a copy of the Llama model whose layers hold smaller ``nn.Linear`` layers cut
    by hand (first units, first heads; KV heads in the model's 2:1 ratio), past ``depth`` removed."""
    ref = copy.deepcopy(model)
    hd = ref.config.head_dim

    def cut(linear: nn.Linear, rows: int | None = None, cols: int | None = None) -> nn.Linear:
        w = linear.weight[: rows or linear.out_features, : cols or linear.in_features]
        new = nn.Linear(w.shape[1], w.shape[0], bias=False)
        new.weight = nn.Parameter(w.detach().clone())
        return new

    for i, layer in enumerate(ref.model.layers[:depth]):
        mlp, att = layer.mlp, layer.self_attn
        mlp.gate_proj, mlp.up_proj = cut(mlp.gate_proj, rows=ffn[i]), cut(mlp.up_proj, rows=ffn[i])
        mlp.down_proj = cut(mlp.down_proj, cols=ffn[i])
        att.q_proj, att.o_proj = cut(att.q_proj, rows=heads[i] * hd), cut(att.o_proj, cols=heads[i] * hd)
        kv = (heads[i] + 1) // 2 * hd  # the KV heads of the groups its query heads belong to
        att.k_proj, att.v_proj = cut(att.k_proj, rows=kv), cut(att.v_proj, rows=kv)
    del ref.model.layers[depth:]
    ref.config.num_hidden_layers = depth
    return ref


@pytest.mark.parametrize(
    "ffn,heads,depth", [([48, 128], [4, 2], 2), ([64, 128], [2, 4], 1), ([128, 48], [1, 4], 2)]
)
def test_per_layer_widths_heads_and_depth_are_weight_prefixes(built, tmp_path, ffn, heads, depth) -> None:
    model, net = built["llama"]
    arch = {"layers.0.ffn": ffn[0], "layers.0.heads": heads[0], "layers.1.ffn": ffn[1], "layers.1.heads": heads[1],
            "depth": depth}  # fmt: skip
    ids = _ids(3)
    with torch.no_grad():
        assert _close(net(ids, arch), _surgery(model, ffn, heads, depth)(input_ids=ids).logits)
    if depth == 2:  # a standard LlamaConfig has one intermediate_size: a per-layer slice is refused
        _one_line_error(ValueError, lambda: export_hf(net, arch, tmp_path / "x"), "LlamaConfig", "per-layer")
        assert not (tmp_path / "x").exists()


def test_refusals_are_one_line(built, tmp_path) -> None:
    llama, net = built["llama"]
    _one_line_error(ValueError, lambda: make_lm_supernet(llama, heads=[3]), "[3]", "multiple of 2")
    _one_line_error(ValueError, lambda: ds.make_supernet(llama, ratios=[0.5, 1.5]), "(0, 1]")
    wide = net.space.largest().replace(**{"layers.0.ffn": 136})  # wider than the model's 128
    _one_line_error(ValueError, lambda: net(_ids(), wide), "layers.0.ffn=136", "allowed")
    _one_line_error(
        ValueError, lambda: net(_ids(), net.space.largest().replace(**{"layers.0.heads": 3})), "heads=3"
    )
    _one_line_error(ValueError, lambda: net(_ids().float(), net.space.largest()), "token ids")
    _one_line_error(ValueError, lambda: make_lm_supernet(llama, torch.zeros(1, 3, 8, 8)), "token ids")
    opt = hf.OPTForCausalLM(hf.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                         num_attention_heads=2, word_embed_proj_dim=16))  # fmt: skip
    _one_line_error(ValueError, lambda: ds.make_supernet(opt), "OPTForCausalLM", "LlamaForCausalLM")
    _, gpt2 = built["gpt2"]
    few_heads = _narrow(gpt2, 2, 2)
    _one_line_error(ValueError, lambda: export_hf(gpt2, few_heads, tmp_path / "g"), "GPT2Config", "head size")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("a user's file")
    _one_line_error(
        FileExistsError, lambda: export_hf(net, net.space.largest(), tmp_path / "full"), "not an empty"
    )
    assert (tmp_path / "full" / "mine.txt").read_text() == "a user's file"


def test_make_supernet_still_needs_an_example_input_for_a_torch_model() -> None:
    _one_line_error(
        ValueError, lambda: ds.make_supernet(nn.Sequential(nn.Linear(4, 4))), "example_input must be a tensor"
    )


def _calibration() -> list[torch.Tensor]:
    return [_ids(10 + k) for k in range(2)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reorder_by_importance_keeps_the_model_and_puts_important_units_first(built, family: str) -> None:
    model, net = built[family]
    net = copy.deepcopy(net)
    ids = _ids(4)
    with torch.no_grad():
        before_out = net(ids, net.space.largest())
    before = reorder_by_importance(net, _calibration())
    with torch.no_grad():
        assert _close(net(ids, net.space.largest()), before_out)  # the largest subnet's function is kept
    after = activation_importance(net, _calibration())
    per_kv = net.heads_per_kv
    for i in range(net.n_stages):
        ffn = after[f"layers.{i}.ffn"]
        want = before[f"layers.{i}.ffn"].sort(descending=True).values
        assert torch.allclose(ffn, want, rtol=1e-4, atol=1e-6)  # units sorted, most important first
        heads = after[f"layers.{i}.heads"].view(-1, per_kv)
        groups = heads.sum(1)
        assert torch.all(groups[:-1] >= groups[1:] - 1e-6)  # KV groups by importance
        assert torch.all(heads[:, :-1] >= heads[:, 1:] - 1e-6)  # query heads within their group
        assert torch.allclose(heads.sum(), before[f"layers.{i}.heads"].sum(), rtol=1e-4)
    assert not torch.equal(before["layers.0.ffn"], after["layers.0.ffn"])  # random init: it did move


def test_reorder_needs_calibration_tokens(built) -> None:
    _, net = built["gpt2"]
    _one_line_error(ValueError, lambda: reorder_by_importance(copy.deepcopy(net), []), "no")
