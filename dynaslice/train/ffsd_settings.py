"""The ``train.ffsd`` config section: the settings of FFSD and DML (:mod:`dynaslice.train.ffsd`).

Defined here, next to the code that reads it, and aggregated by
:class:`dynaslice.train.config.Config`; it imports only :mod:`dynaslice.config_base`, so that
the aggregate can import it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FFSDConfig:
    """FFSD and DML (``train.target: ffsd`` / ``dml``, :mod:`dynaslice.train.ffsd`).

    ``students``: the common students m (DML: the students; 1 = the network alone). The
    official code's weights: ``lambda_fusion`` (the leader's feature terms), ``lambda_diversity``
    (student diversity and self-distillation), ``lambda_decoder`` (the decoders' own loss), each
    times ``exp(-5 (1 - e / warmup_epochs)^2)`` in epoch e <= ``warmup_epochs``. The fusion module
    decays its weights by ``fusion_weight_decay``; the decoders learn with Adam at ``decoder_lr``.
    The temperature is ``train.temperature`` (the official 2 in configs/ffsd.yaml).
    """

    students: int = 2
    lambda_fusion: float = 10.0
    lambda_diversity: float = 1e-5
    lambda_decoder: float = 1000.0
    warmup_epochs: int = 5
    fusion_weight_decay: float = 1e-5
    decoder_lr: float = 1e-3
