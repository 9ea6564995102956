"""Hugging Face language models as supernets: ``make_supernet(hf_model)``.

A ``transformers`` model is not traced: its modules are known, so each family says which of its
weights a slice shortens, and the supernet's forward runs the family's own block on those
slices (dense prefixes of the weights, never masks). The dimensions (MatFormer, DynaBERT,
Sorted LLaMA):

- ``layers.{i}.ffn``: the FFN width of layer ``i`` (its first ``n`` hidden units; DS-Net's width
  grid rounded to multiples of 8 by default);
- ``layers.{i}.heads``: the query heads of layer ``i`` (its first ``n`` heads). With grouped-query
  attention the choices are multiples of the heads per KV head ``g`` (a slice keeps its first
  ``n / g`` KV heads) or fewer than ``g`` (one KV head), so every query head keeps the KV head
  it was trained with (multi-query attention slices any head count);
- ``depth``: how many layers run (the first ``k``).

The hidden size, embeddings, norms and the output head are never sliced. The largest subnet is
the model itself (checked on an example input when the supernet is built). Only the FFN and
attention of a layer differ from the model's own modules, whose norms, embeddings, rotary
tables and dropouts the supernet calls as they are.

Families: Llama-style causal LMs (``LlamaForCausalLM``), GPT-2 (``GPT2LMHeadModel``) and BERT
encoders (``BertModel``, whose output is the last hidden state). Inputs are token ids
``[batch, tokens]`` without padding (no attention mask yet); ``input_size`` is ``(tokens,)``.

Incremental decoding (causal families): :meth:`LMSupernet.forward_cached` runs new tokens after
those held in a :class:`KVCache` of the same arch (the keys and values of each layer's sliced
heads), with the logits of running the whole sequence at once.

Costs are per token and analytic (:func:`count_params`, :func:`count_macs`): a slice's parameters
are those of its exported checkpoint, its MACs those of its matrix products.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import Supernet
from ..space import Arch, Dim, SearchSpace, dsnet_ratios, width_grid

# unit -> what a sliced axis counts: "ffn" hidden units, "q" query-head channels, "kv" KV-head
# channels, "qkv" GPT-2's fused projection (three segments of query-head channels)
Rule = tuple[str, int]


class KVCache:
    """The keys and values of the tokens one subnet ``arch`` has decoded so far, per layer
    (``[batch, kv heads, tokens, head_dim]``, the slice's own heads), for
    :meth:`LMSupernet.forward_cached`.

    Each subnet decodes with a cache of its own: a narrower slice's layers see other hidden
    states, so its keys are other tensors, and the arch it was made for is checked on every use.
    ``truncate`` drops rejected tokens (speculative decoding). ``transformers``' ``DynamicCache``
    would do the same bookkeeping, but it knows nothing of the arch, and building one needs
    ``transformers`` imported, which this module leaves to the model.
    """

    def __init__(self, arch: Arch):
        self.arch = arch
        self.length = 0  # tokens held
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s keys and values with the new ones (``k``, ``v``) appended."""
        if i in self.layers:
            past_k, past_v = self.layers[i]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.layers[i] = (k, v)
        return k, v

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (views: no copy)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of {self.length} tokens to {length}")
        self.layers = {i: (k[:, :, :length], v[:, :, :length]) for i, (k, v) in self.layers.items()}
        self.length = length


class LMSupernet(Supernet):
    """A Hugging Face transformer as a supernet (build it with :func:`make_lm_supernet`).

    ``model`` is the (copied) Hugging Face model, whose parameter names the state dict keeps
    under ``model.``. Stages are the layers: the stem embeds the tokens, stage ``i`` runs layer
    ``i`` (or passes its input on when ``i >= depth``), the head is the family's output.
    Subclasses name the layers' prefix (``LAYERS``), the rules that slice each layer weight
    (``RULES``: local name -> (unit, axis)), and run one block and the ends.
    """

    LAYERS: str
    RULES: Mapping[str, Rule]
    HEAD: str | None = None  # the output projection's weight (a matrix product per token), if any
    # the layer modules that read the FFN's hidden units and the heads' outputs (importance ordering)
    FFN_OUT: str
    ATTN_OUT: str
    CAUSAL = True  # decodes token by token (forward_cached)

    def __init__(self, model: nn.Module, space: SearchSpace, seq_len: int, heads_per_kv: int):
        super().__init__()
        self.model = model
        self.space = space
        self.config = model.config
        self.n_stages = self.config.num_hidden_layers
        self.input_size = (seq_len,)  # type: ignore[assignment]  # tokens, not (C, H, W)
        self.num_classes = self._out_features()
        self.heads_per_kv = heads_per_kv
        self.family = type(model).__name__

    def extra_repr(self) -> str:
        return f"family={self.family}, layers={self.n_stages}, dims={len(self.space.dims)}"

    # --- the family's sizes --------------------------------------------------------------------
    def _out_features(self) -> int:  # pragma: no cover - every family says
        raise NotImplementedError

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def _full(self, unit: str) -> int:
        c = self.config
        return {
            "ffn": self.ffn_max,
            "q": c.num_attention_heads * self.head_dim,
            "kv": c.num_attention_heads // self.heads_per_kv * self.head_dim,
            "qkv": c.num_attention_heads * self.head_dim,
        }[unit]

    @property
    def ffn_max(self) -> int:
        return self.space["layers.0.ffn"].max

    def _kept(self, i: int, unit: str, arch: Arch) -> int:
        if unit == "ffn":
            return arch[f"layers.{i}.ffn"]
        heads = arch[f"layers.{i}.heads"]
        return (self.kv_heads(heads) if unit == "kv" else heads) * self.head_dim

    def kv_heads(self, heads: int) -> int:
        """The KV heads a slice with ``heads`` query heads keeps: the groups its heads belong to
        (one KV head for fewer than a group's ``heads_per_kv`` query heads)."""
        return -(-heads // self.heads_per_kv)

    # --- the one place where weights are sliced (forward, export and costs read it) ----------
    def _slice(self, tensor: torch.Tensor, unit: str, axis: int, n: int) -> torch.Tensor:
        if unit == "qkv":  # GPT-2's c_attn: [queries | keys | values], each of the full width
            full = self._full("qkv")
            return torch.cat([tensor.narrow(axis, s * full, n) for s in range(3)], dim=axis)
        return tensor.narrow(axis, 0, n)

    def _w(self, i: int, local: str, arch: Arch) -> torch.Tensor:
        """Layer ``i``'s weight ``local`` as subnet ``arch`` reads it (a view, except GPT-2's qkv)."""
        tensor = self.model.get_parameter(f"{self.LAYERS}.{i}.{local}")
        unit, axis = self.RULES[local]
        return self._slice(tensor, unit, axis, self._kept(i, unit, arch))

    def _split(self, name: str) -> tuple[int, str] | None:
        """``(layer, local name)`` of a layer tensor's full name, else None."""
        match = re.fullmatch(rf"{re.escape(self.LAYERS)}\.(\d+)\.(.+)", name)
        return (int(match.group(1)), match.group(2)) if match else None

    def sliced_state_dict(self, arch: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """The model's state dict for subnet ``arch``: layers past its depth dropped, sliced
        weights cut to their prefixes (copies: what :func:`~dynaslice.lm.export_hf` saves)."""
        arch = self.space.validate(arch)
        out = {}
        for name, tensor in self.model.state_dict().items():
            where = self._split(name)
            if where is not None:
                i, local = where
                if i >= arch["depth"]:
                    continue
                if local in self.RULES:
                    unit, axis = self.RULES[local]
                    tensor = self._slice(tensor, unit, axis, self._kept(i, unit, arch))
            out[name] = tensor.detach().clone()
        return out

    def fraction(self, name: str, arch: Arch) -> float:
        """How much of the model's tensor ``name`` subnet ``arch`` keeps (0 for a dropped layer)."""
        where = self._split(name)
        if where is None:
            return 1.0
        i, local = where
        if i >= arch["depth"]:
            return 0.0
        if local not in self.RULES:
            return 1.0
        unit = self.RULES[local][0]
        return self._kept(i, unit, arch) / self._full(unit)

    # --- the Supernet contract ----------------------------------------------------------------
    def stage_dims(self, i: int) -> tuple[str, ...]:
        if i == -1:
            return ()
        if i == self.n_stages:
            return ("depth",)
        return (f"layers.{i}.ffn", f"layers.{i}.heads", "depth")

    def forward(self, input_ids: torch.Tensor, arch: Mapping[str, int]) -> torch.Tensor:  # type: ignore[override]
        return super().forward(_token_ids(self.family, input_ids), arch)

    def forward_stage(self, i: int, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return x if i >= arch["depth"] else self._block(i, x, arch)

    def _block(self, i: int, x: torch.Tensor, arch: Arch, cache: KVCache | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def forward_cached(self, input_ids: torch.Tensor, arch: Mapping[str, int], cache: KVCache) -> torch.Tensor:
        """Logits ``[batch, new, vocab]`` of the new tokens ``input_ids`` following those whose keys
        and values ``cache`` holds (empty: a prompt), appending theirs to ``cache``.

        Equal to the last ``new`` positions of ``self(all tokens, arch)``. A cache belongs to the
        arch it was made for (``KVCache(arch)``): another arch's keys would be other
        tensors, so a mismatch is a ValueError rather than wrong logits.
        """
        if not self.CAUSAL:
            raise ValueError(f"{self.family} is an encoder: it has no incremental decoding")
        arch = self.space.validate(arch)
        if cache.arch != arch:
            raise ValueError(f"this KV cache was filled by another subnet ({cache.arch}), not {arch}")
        x = self.forward_stem(_token_ids(self.family, input_ids), arch, start=cache.length)
        for i in range(arch["depth"]):
            x = self._block(i, x, arch, cache)
        cache.length += input_ids.shape[1]
        return self.forward_head(x, arch)

    def _linear(self, x: torch.Tensor, i: int, module: str, arch: Arch) -> torch.Tensor:
        """``nn.Linear`` ``module`` of layer ``i`` on its sliced weight (and bias, where it has one)."""
        bias = self.model.get_submodule(f"{self.LAYERS}.{i}.{module}").bias
        if bias is not None and f"{module}.bias" in self.RULES:
            bias = self._w(i, f"{module}.bias", arch)
        return F.linear(x, self._w(i, f"{module}.weight", arch), bias)

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        """``[batch, tokens, heads * head_dim]`` -> ``[batch, heads, tokens, head_dim]``."""
        return z.view(*z.shape[:2], -1, self.head_dim).transpose(1, 2)

    def _sdpa(self, q, k, v, scale: float, p: float, causal: bool) -> torch.Tensor:
        """Attention as the model's default ``sdpa`` runs it (torch's SDPA; KV heads shared by
        groups of query heads), back to ``[batch, tokens, heads * head_dim]``."""
        b, _, t, _ = q.shape
        s = k.shape[2]
        # t new queries after s - t cached keys: query j sees the cache and new keys up to j (SDPA's
        # is_causal aligns the mask top-left, right only when nothing is cached)
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t) if causal and 1 < t < s else None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p if self.training else 0.0,
            is_causal=causal and t > 1 and mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
        return out.transpose(1, 2).reshape(b, t, -1)


class LlamaSupernet(LMSupernet):
    """``LlamaForCausalLM``: RMSNorm, rotary positions, grouped-query attention, gated FFN."""

    LAYERS = "model.layers"
    RULES = {
        "self_attn.q_proj.weight": ("q", 0), "self_attn.q_proj.bias": ("q", 0),
        "self_attn.k_proj.weight": ("kv", 0), "self_attn.k_proj.bias": ("kv", 0),
        "self_attn.v_proj.weight": ("kv", 0), "self_attn.v_proj.bias": ("kv", 0),
        "self_attn.o_proj.weight": ("q", 1),
        "mlp.gate_proj.weight": ("ffn", 0), "mlp.gate_proj.bias": ("ffn", 0),
        "mlp.up_proj.weight": ("ffn", 0), "mlp.up_proj.bias": ("ffn", 0),
        "mlp.down_proj.weight": ("ffn", 1),
    }  # fmt: skip
    FFN_OUT, ATTN_OUT = "mlp.down_proj", "self_attn.o_proj"
    HEAD = "lm_head.weight"

    def _out_features(self) -> int:
        return self.config.vocab_size

    def forward_stem(self, x: torch.Tensor, arch: Arch, start: int = 0) -> torch.Tensor:
        return self.model.model.embed_tokens(x)  # positions are rotary, in the attention

    def _block(self, i: int, x: torch.Tensor, arch: Arch, cache: KVCache | None = None) -> torch.Tensor:
        layer = self.model.model.layers[i]
        x = x + self._attention(i, layer.input_layernorm(x), arch, cache)
        return x + self._ffn(i, layer.post_attention_layernorm(x), arch)

    def _attention(self, i: int, h: torch.Tensor, arch: Arch, cache: KVCache | None = None) -> torch.Tensor:
        """Layer ``i``'s attention on the normed input ``h`` (its keys and values appended to ``cache``)."""
        attn = self.model.model.layers[i].self_attn
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + h.shape[1], device=h.device)[None]
        cos, sin = self.model.model.rotary_emb(h, positions)
        q, k, v = (self._heads(self._linear(h, i, f"self_attn.{n}_proj", arch)) for n in "qkv")
        q, k = _rotate(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, k, v)
        a = self._sdpa(q, k, v, attn.scaling, attn.attention_dropout, causal=True)
        return self._linear(a, i, "self_attn.o_proj", arch)

    def _ffn(self, i: int, h: torch.Tensor, arch: Arch) -> torch.Tensor:
        """Layer ``i``'s gated FFN on the normed input ``h``."""
        act = self.model.model.layers[i].mlp.act_fn
        h = act(self._linear(h, i, "mlp.gate_proj", arch)) * self._linear(h, i, "mlp.up_proj", arch)
        return self._linear(h, i, "mlp.down_proj", arch)

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(x))


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


class GPT2Supernet(LMSupernet):
    """``GPT2LMHeadModel``: learned positions, LayerNorm, fused qkv ``Conv1D`` (weights ``[in, out]``)."""

    LAYERS = "transformer.h"
    RULES = {
        "attn.c_attn.weight": ("qkv", 1), "attn.c_attn.bias": ("qkv", 0),
        "attn.c_proj.weight": ("q", 0),
        "mlp.c_fc.weight": ("ffn", 1), "mlp.c_fc.bias": ("ffn", 0),
        "mlp.c_proj.weight": ("ffn", 0),
    }  # fmt: skip
    FFN_OUT, ATTN_OUT = "mlp.c_proj", "attn.c_proj"
    HEAD = "lm_head.weight"

    def _out_features(self) -> int:
        return self.config.vocab_size

    def forward_stem(self, x: torch.Tensor, arch: Arch, start: int = 0) -> torch.Tensor:
        t = self.model.transformer
        positions = torch.arange(start, start + x.shape[1], device=x.device)[None]
        return t.drop(t.wte(x) + t.wpe(positions))

    def _block(self, i: int, x: torch.Tensor, arch: Arch, cache: KVCache | None = None) -> torch.Tensor:
        block = self.model.transformer.h[i]
        x = x + self._attention(i, block.ln_1(x), arch, cache)
        return x + self._ffn(i, block.ln_2(x), arch)

    def _attention(self, i: int, h: torch.Tensor, arch: Arch, cache: KVCache | None = None) -> torch.Tensor:
        """Layer ``i``'s attention on the normed input ``h`` (its keys and values appended to ``cache``)."""
        attn = self.model.transformer.h[i].attn
        qkv = _conv1d(h, self._w(i, "attn.c_attn.weight", arch), self._w(i, "attn.c_attn.bias", arch))
        q, k, v = (self._heads(z) for z in qkv.chunk(3, dim=-1))
        if cache is not None:
            k, v = cache.update(i, k, v)
        a = self._sdpa(q, k, v, attn.scaling, attn.attn_dropout.p, causal=True)
        return attn.resid_dropout(_conv1d(a, self._w(i, "attn.c_proj.weight", arch), attn.c_proj.bias))

    def _ffn(self, i: int, h: torch.Tensor, arch: Arch) -> torch.Tensor:
        """Layer ``i``'s FFN on the normed input ``h``."""
        mlp = self.model.transformer.h[i].mlp
        h = mlp.act(_conv1d(h, self._w(i, "mlp.c_fc.weight", arch), self._w(i, "mlp.c_fc.bias", arch)))
        return mlp.dropout(_conv1d(h, self._w(i, "mlp.c_proj.weight", arch), mlp.c_proj.bias))

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self.model.lm_head(self.model.transformer.ln_f(x))


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)


class BertSupernet(LMSupernet):
    """``BertModel`` (an encoder): post-LayerNorm blocks, bidirectional attention; outputs the
    last hidden state."""

    LAYERS = "encoder.layer"
    RULES = {
        "attention.self.query.weight": ("q", 0), "attention.self.query.bias": ("q", 0),
        "attention.self.key.weight": ("q", 0), "attention.self.key.bias": ("q", 0),
        "attention.self.value.weight": ("q", 0), "attention.self.value.bias": ("q", 0),
        "attention.output.dense.weight": ("q", 1),
        "intermediate.dense.weight": ("ffn", 0), "intermediate.dense.bias": ("ffn", 0),
        "output.dense.weight": ("ffn", 1),
    }  # fmt: skip
    FFN_OUT, ATTN_OUT = "output.dense", "attention.output.dense"
    CAUSAL = False

    def _out_features(self) -> int:
        return self.config.hidden_size

    def forward_stem(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self.model.embeddings(input_ids=x)

    def _block(self, i: int, x: torch.Tensor, arch: Arch, cache: KVCache | None = None) -> torch.Tensor:
        layer = self.model.encoder.layer[i]
        att, out = layer.attention, layer.output
        q, k, v = (
            self._heads(self._linear(x, i, f"attention.self.{n}", arch)) for n in ("query", "key", "value")
        )
        a = self._sdpa(q, k, v, att.self.scaling, att.self.dropout.p, causal=False)
        x = att.output.LayerNorm(att.output.dropout(self._linear(a, i, "attention.output.dense", arch)) + x)
        h = layer.intermediate.intermediate_act_fn(self._linear(x, i, "intermediate.dense", arch))
        return out.LayerNorm(out.dropout(self._linear(h, i, "output.dense", arch)) + x)

    def forward_head(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return x


_FAMILIES: dict[str, type[LMSupernet]] = {
    "LlamaForCausalLM": LlamaSupernet,
    "GPT2LMHeadModel": GPT2Supernet,
    "BertModel": BertSupernet,
}


def _token_ids(family: str, ids: object) -> torch.Tensor:
    """``ids`` when it is a ``[batch, tokens]`` tensor of token ids, else a one-line ValueError."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        got = (
            f"{ids.dtype} of shape {tuple(ids.shape)}"
            if isinstance(ids, torch.Tensor)
            else type(ids).__name__
        )
        raise ValueError(f"{family} supernet takes token ids [batch, tokens] (torch.long), got {got}")
    return ids


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (without importing ``transformers``:
    a model of it exists only once it is imported)."""
    hf = sys.modules.get("transformers")
    return hf is not None and isinstance(model, hf.PreTrainedModel)


def _ffn_size(config) -> int:
    if getattr(config, "model_type", "") == "gpt2":
        return config.n_inner or 4 * config.hidden_size
    return config.intermediate_size


def _check_config(family: str, config) -> None:
    """Refuse, in one line, the options the family's block here does not run."""
    unsupported = {
        "add_cross_attention": getattr(config, "add_cross_attention", False),
        "is_decoder": family == "BertModel" and getattr(config, "is_decoder", False),
    }
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise ValueError(f"make_supernet does not slice {family} with {', '.join(found)}=True yet")
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        raise ValueError(
            f"make_supernet runs {family}'s attention as torch's SDPA; the model uses "
            f"{config._attn_implementation!r} attention (build it with attn_implementation='sdpa')"
        )


def _head_choices(family: str, heads: int, kv_heads: int, chosen: Sequence[int] | None) -> tuple[int, ...]:
    """Query-head counts whose slice keeps each head's KV head: whole groups of ``g = heads /
    kv_heads`` (then KV heads ``n / g``), or fewer than ``g`` heads of the first group (one KV head)."""
    group = heads // kv_heads
    valid = [h for h in range(1, heads + 1) if h % group == 0 or h < group]
    if chosen is None:
        return tuple(valid)
    bad = [h for h in chosen if h not in valid]
    if bad:
        raise ValueError(
            f"head choices {bad} are not valid for {family}: its {heads} query heads share {kv_heads} KV "
            f"head(s), so a slice keeps a multiple of {group} query heads (or fewer than {group}), at most {heads}"
        )
    return tuple(sorted(set(chosen) | {heads}))


def make_lm_supernet(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    ratios: Sequence[float] | None = None,
    round_to: int = 8,
    heads: Sequence[int] | None = None,
) -> LMSupernet:
    """A Hugging Face ``model`` as a supernet (see the module docstring); ``model`` is left untouched.

    ``ratios`` (default DS-Net's 0.35:0.05:1.0) of each layer's FFN width, rounded to multiples
    of ``round_to``, are its width choices; ``heads`` (default every valid count) the query-head
    choices of every layer. ``example_input`` (token ids ``[batch, tokens]``; default 8 tokens)
    checks that the largest subnet gives the model's own output and sets ``input_size``.
    Raises ValueError (one line) for families, options or choices it cannot slice.
    """
    family = type(model).__name__
    if family not in _FAMILIES:
        raise ValueError(
            f"make_supernet slices the Hugging Face families {', '.join(_FAMILIES)}; {family} "
            f"(model_type {getattr(model.config, 'model_type', '?')!r}) is not one of them yet"
        )
    config = model.config
    _check_config(family, config)
    ratios = tuple(dsnet_ratios() if ratios is None else ratios)
    if not ratios or any(not 0 < r <= 1 for r in ratios) or round_to < 1:
        raise ValueError(
            f"FFN width ratios must lie in (0, 1] and round_to be >= 1; got {ratios}, {round_to}"
        )
    n_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    head_choices = _head_choices(family, n_heads, kv_heads, heads)
    ffn = width_grid(_ffn_size(config), ratios, round_to)
    layers = config.num_hidden_layers
    dims = [Dim(f"layers.{i}.{what}", choices) for i in range(layers) for what, choices in
            (("ffn", ffn), ("heads", head_choices))]  # fmt: skip
    dims.append(Dim("depth", tuple(range(1, layers + 1)), kind="depth"))
    if example_input is None:
        device = next(model.parameters()).device
        example_input = torch.arange(8, device=device).remainder(config.vocab_size)[None]
    example_input = _token_ids(family, example_input)
    net = _FAMILIES[family](
        copy.deepcopy(model), SearchSpace(tuple(dims)), example_input.shape[1], n_heads // kv_heads
    )
    net.train(model.training)
    _verify(net, model, example_input)
    return net


@torch.no_grad()
def _verify(net: LMSupernet, model: nn.Module, ids: torch.Tensor) -> None:
    """The largest subnet must be the model (eval mode: no dropout), the smallest must run."""
    modes = {m: m.training for m in net.modules()}
    was = model.training
    net.eval()
    model.eval()
    try:
        want = model(input_ids=ids)
        want = want.logits if hasattr(want, "logits") else want.last_hidden_state
        got = net(ids, net.space.largest())
        net(ids, net.space.smallest())
    finally:
        model.train(was)
        for m, training in modes.items():
            m.training = training
    if got.shape != want.shape or not torch.allclose(
        got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())
    ):
        raise ValueError(
            f"the largest subnet of {net.family} differs from the model by "
            f"{float((got - want).abs().max()):.3g}: make_supernet does not run this model's variant correctly"
        )


def count_params(net: LMSupernet, arch: Mapping[str, int]) -> int:
    """Parameters of subnet ``arch``: those of its exported checkpoint (tied weights once)."""
    arch = net.space.validate(arch)
    total = 0.0
    for name, p in net.model.named_parameters():  # tied weights are listed once
        total += p.numel() * net.fraction(name, arch)
    return round(total)


def count_macs(net: LMSupernet, arch: Mapping[str, int], context: int = 0) -> int:
    """MACs per token of subnet ``arch``: its matrix products with weights (each layer's
    projections and the output head; embeddings are lookups), plus, with ``context`` > 0, the
    attention products of one query over ``context`` keys (``2 * heads * head_dim * context``
    per layer). Over ``T`` tokens with eager attention (the full ``T x T`` products, causal or
    not), torch's FLOP counter gives ``T * count_macs(..., context=T)``."""
    arch = net.space.validate(arch)
    total = 0.0
    for name, p in net.model.named_parameters():
        where = net._split(name)
        if where is not None and p.dim() == 2:
            total += p.numel() * net.fraction(name, arch)
    if net.HEAD is not None:
        total += net.model.get_parameter(net.HEAD).numel()
    for i in range(arch["depth"]):
        total += 2 * arch[f"layers.{i}.heads"] * net.head_dim * context
    return round(total)
