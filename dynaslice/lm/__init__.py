"""Hugging Face transformer language models as supernets (issue 32).

``dynaslice.make_supernet(hf_model)`` builds an :class:`LMSupernet` (sliced FFN widths, heads
and depth: :mod:`dynaslice.lm.supernet`); :func:`reorder_by_importance` puts each layer's most
important units and heads first (:mod:`dynaslice.lm.ordering`); :func:`export_hf` writes one
slice as a standalone Hugging Face checkpoint. :class:`ElasticLM` serves every budget from one
set of weights, with self-speculative decoding (:mod:`dynaslice.lm.serve`); :func:`search` finds
Mix'n'Match slices on a latency table measured here (:mod:`dynaslice.lm.search`). Importing
this package does not import ``transformers``: a model of it brings it (``pip install
dynaslice[lm]``).
"""

from .export import export_hf, subnet_config
from .ordering import activation_importance, reorder_by_importance
from .search import budget_table, decode_latency_table, search
from .serve import ElasticLM
from .supernet import KVCache, LMSupernet, count_macs, count_params, make_lm_supernet

__all__ = [
    "ElasticLM",
    "KVCache",
    "LMSupernet",
    "activation_importance",
    "budget_table",
    "count_macs",
    "count_params",
    "decode_latency_table",
    "export_hf",
    "make_lm_supernet",
    "reorder_by_importance",
    "search",
    "subnet_config",
]
