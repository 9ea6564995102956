"""A slice of a language-model supernet as a standalone Hugging Face checkpoint.

``export_hf(net, arch, out)`` writes a directory that ``transformers`` alone loads
(``AutoModelForCausalLM.from_pretrained(out)``, ``AutoModel`` for BERT): the family's own config
with the slice's sizes and the sliced weights (:meth:`LMSupernet.sliced_state_dict`), saved by
the family's own ``save_pretrained``. Its outputs equal ``net(ids, arch)``.

A standard config has one FFN width and one head count for all layers, so a slice whose layers
differ is refused, naming the config field (``LlamaConfig``, ``GPT2Config`` and ``BertConfig``
build every layer from one ``intermediate_size`` / ``n_inner`` and one head count). GPT-2 and
BERT also derive the head size from ``hidden_size / num_heads``, so they export only slices
with all heads; Llama's config names ``head_dim`` and exports any head count.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

from ..atomic import atomic_dir
from .supernet import GPT2Supernet, LMSupernet


def subnet_config(net: LMSupernet, arch: Mapping[str, int]):
    """The family's config for subnet ``arch`` (a copy of the model's with the slice's sizes)."""
    arch = net.space.validate(arch)
    depth = arch["depth"]
    cfg_name = type(net.config).__name__
    ffn = {arch[f"layers.{i}.ffn"] for i in range(depth)}
    heads = {arch[f"layers.{i}.heads"] for i in range(depth)}
    if len(ffn) > 1 or len(heads) > 1:
        field = "n_inner" if isinstance(net, GPT2Supernet) else "intermediate_size"
        what = "FFN widths" if len(ffn) > 1 else "head counts"
        raise ValueError(
            f"{cfg_name} builds every layer from one {field} and one num_attention_heads (each an int in "
            f"transformers {_version()}); this slice has per-layer {what} "
            f"{sorted(ffn if len(ffn) > 1 else heads)}: export a slice that is uniform over its layers"
        )
    (ffn,), (heads,) = ffn, heads
    config = copy.deepcopy(net.config)
    full_heads = config.num_attention_heads
    if heads != full_heads and not hasattr(config, "head_dim"):
        raise ValueError(
            f"{cfg_name} derives the head size from hidden_size / num_attention_heads, so a slice with "
            f"{heads} of its {full_heads} heads has no standard {cfg_name}: export a slice with all heads"
        )
    if isinstance(net, GPT2Supernet):
        config.n_inner = ffn
    else:
        config.intermediate_size = ffn
    config.num_hidden_layers = depth
    config.num_attention_heads = heads
    if hasattr(config, "head_dim"):
        config.head_dim = net.head_dim
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = net.kv_heads(heads)
    return config


def _version() -> str:
    from transformers import __version__

    return __version__


def export_hf(net: LMSupernet, arch: Mapping[str, int], out: str | os.PathLike) -> Path:
    """Write subnet ``arch`` of ``net`` to the directory ``out`` as a Hugging Face checkpoint.

    ``out`` must not exist or be empty (a user's folder is never replaced); the directory is
    written whole or not at all. Returns its path.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not an empty directory; give a new directory for the checkpoint"
        )
    config = subnet_config(net, arch)
    model = type(net.model)(config)
    model.load_state_dict(net.sliced_state_dict(arch), strict=True)
    model.train(net.training)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    return out
