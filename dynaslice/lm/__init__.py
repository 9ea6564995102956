"""Hugging Face transformer language models as supernets (issue 32).

``dynaslice.make_supernet(hf_model)`` builds an :class:`LMSupernet` (sliced FFN widths, heads
and depth: :mod:`dynaslice.lm.supernet`); :func:`reorder_by_importance` puts each layer's most
important units and heads first (:mod:`dynaslice.lm.ordering`); :func:`export_hf` writes one
slice as a standalone Hugging Face checkpoint. Importing this package does not import
``transformers``: a model of it brings it (``pip install dynaslice[lm]``).
"""

from .export import export_hf, subnet_config
from .ordering import activation_importance, reorder_by_importance
from .supernet import LMSupernet, count_macs, count_params, make_lm_supernet

__all__ = [
    "LMSupernet",
    "activation_importance",
    "count_macs",
    "count_params",
    "export_hf",
    "make_lm_supernet",
    "reorder_by_importance",
    "subnet_config",
]
