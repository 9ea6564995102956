"""Importance ordering of a language-model supernet: the most important FFN units and heads first.

A slice keeps the *first* units and heads of each layer. In a model trained alone nothing makes
those the important ones, so before nested training (or before exporting slices of an
untrained-for-slicing model) each layer's units and heads are sorted by importance, as
DynaBERT's rewiring and Minitron's pruning do. The importance here is Minitron's activation
importance, measured on the largest subnet over a few calibration batches:

- an FFN unit: the mean ``|activation|`` of that unit where the FFN's output projection reads it;
- a head: the mean L2 norm of that head's attention output where the output projection reads it.

With grouped-query attention a KV head and the ``g`` query heads that read it move together
(their group's importance is the sum of theirs), and the query heads are sorted within their
group, so every query head keeps its KV head. The permutation moves each weight's rows or
columns with the rules the slices use (:attr:`LMSupernet.RULES`), which leaves the largest
subnet's function unchanged (rotary positions act on each head alike).

Reorder *before* building an optimizer or an EMA copy: their buffers are not permuted.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .supernet import LMSupernet


@torch.no_grad()
def activation_importance(net: LMSupernet, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer ``i``: ``layers.{i}.ffn`` (one value per FFN unit) and ``layers.{i}.heads`` (one
    per query head), averaged over every token of ``batches`` (token ids ``[batch, tokens]``) run
    through the model in eval mode (the largest subnet). Raises ValueError when there are no tokens."""
    sums: dict[str, torch.Tensor] = {}
    hd, heads = net.head_dim, net.config.num_attention_heads

    def record(name: str, per_head: bool):
        def hook(module, args) -> None:
            x = args[0].detach().float()
            value = x.reshape(-1, heads, hd).norm(dim=-1) if per_head else x.reshape(-1, x.shape[-1]).abs()
            sums[name] = sums.get(name, 0) + value.sum(0)

        return hook

    handles = []
    for i in range(net.n_stages):
        for module, dim, per_head in ((net.FFN_OUT, "ffn", False), (net.ATTN_OUT, "heads", True)):
            target = net.model.get_submodule(f"{net.LAYERS}.{i}.{module}")
            handles.append(target.register_forward_pre_hook(record(f"layers.{i}.{dim}", per_head)))
    modes = {m: m.training for m in net.modules()}
    net.eval()
    tokens = 0
    try:
        for ids in batches:
            net.model(input_ids=ids)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if tokens == 0:
        raise ValueError("activation_importance needs at least one batch of token ids; got none")
    return {name: total / tokens for name, total in sums.items()}


def _head_order(importance: torch.Tensor, per_kv: int) -> torch.Tensor:
    """Query heads by importance: KV groups by their summed importance, then heads within each."""
    groups = importance.view(-1, per_kv)
    by_group = torch.argsort(groups.sum(1), descending=True, stable=True)
    within = torch.argsort(groups, dim=1, descending=True, stable=True)
    return torch.cat([g * per_kv + within[g] for g in by_group.tolist()])


def _channels(order: torch.Tensor, size: int) -> torch.Tensor:
    """The channel indices of units ``order``, each ``size`` channels wide."""
    return (order[:, None] * size + torch.arange(size)).flatten()


@torch.no_grad()
def reorder_by_importance(net: LMSupernet, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sort every layer's FFN units and heads of ``net`` by :func:`activation_importance`, in place.

    Returns the importance measured before the reordering. The largest subnet computes the same
    function afterwards; a slice then keeps the most important units and heads of each layer.
    """
    importance = activation_importance(net, batches)
    hd, per_kv = net.head_dim, net.heads_per_kv
    full_q = net.config.num_attention_heads * hd
    for i in range(net.n_stages):
        ffn = torch.argsort(importance[f"layers.{i}.ffn"], descending=True, stable=True)
        heads = _head_order(importance[f"layers.{i}.heads"], per_kv)
        q = _channels(heads, hd)
        index = {
            "ffn": ffn,
            "q": q,
            "kv": _channels(heads[::per_kv] // per_kv, hd),  # each group's KV head, in the groups' order
            "qkv": torch.cat([q + s * full_q for s in range(3)]),
        }
        for local, param in net.model.get_submodule(f"{net.LAYERS}.{i}").named_parameters():
            if local in net.RULES:
                unit, axis = net.RULES[local]
                param.copy_(param.index_select(axis, index[unit].to(param.device)))
    return importance
