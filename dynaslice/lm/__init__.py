"""Hugging Face transformer language models as supernets (issue 32).

``dynaslice.make_supernet(hf_model)`` builds an :class:`LMSupernet` (sliced FFN widths, heads
and depth: :mod:`dynaslice.lm.supernet`); :func:`export_hf` writes one slice as a standalone
Hugging Face checkpoint. Importing this package imports ``transformers`` lazily: only the
families' blocks and the export need it (``pip install dynaslice[lm]``).
"""

from .export import export_hf, subnet_config
from .supernet import LMSupernet, count_macs, count_params, make_lm_supernet

__all__ = ["LMSupernet", "count_macs", "count_params", "export_hf", "make_lm_supernet", "subnet_config"]
