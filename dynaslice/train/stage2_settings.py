"""The ``stage2`` config section: Stage II, ``dynaslice train-gate`` (:mod:`dynaslice.train.stage2`).

Defined here, next to the code that reads it, and aggregated by
:class:`dynaslice.train.config.Config`; it imports only :mod:`dynaslice.config_base`, so that
the aggregate can import it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..config_base import NON_NEGATIVE, POSITIVE, ConfigError, Rule, between, whole

if TYPE_CHECKING:
    from .config import Config


@dataclass
class Stage2Config:
    """Stage II (``dynaslice train-gate``): only the gate's slimming head learns.

    ``target_macs``: the average MACs per image the complexity penalty pulls toward -- a
    fraction (<= 1) of the widest route's MACs or absolute MACs; ``null`` switches the penalty
    off (plain SGS). The Gumbel temperature anneals exponentially from ``tau_start`` to
    ``tau_end`` over the run. ``drop_hopeless``: samples even the widest route gets wrong get
    no gate target. ``train_gate_trunk``: the gate's shared 1x1 conv learns too (from the
    route logits only; the attention scale the backbone was trained with changes with it).
    ``calibrate``: after training, shift the slimming head's bias on the validation split so that
    argmax routing spends at most ``target_macs`` on average
    (:func:`dynaslice.gate.calibrate_route_bias`); without it the raw argmax can miss the
    target widely (every image on one route).
    SGD with momentum and a cosine schedule; the batch size is ``data.batch_size``.
    """

    epochs: int = 3
    lr: float = 0.05
    momentum: float = 0.9
    target_macs: float | None = 0.6
    drop_hopeless: bool = False
    train_gate_trunk: bool = False
    calibrate: bool = True
    tau_start: float = 1.0
    tau_end: float = 0.1
    gate_weight: float = 1.0
    task_weight: float = 1.0
    macs_weight: float = 10.0

    RANGES: ClassVar[dict[str, Rule]] = {
        "epochs": whole(1),
        "lr": POSITIVE,
        "momentum": between(0, 1, hi_open=True),
        "target_macs": (
            (lambda v: 0 < v <= 1 or v >= 1000),
            "use a fraction in (0, 1] of the widest route, or MACs like 12e6 (or null for no target)",
        ),
        "tau_start": POSITIVE,
        "tau_end": POSITIVE,
        "gate_weight": NON_NEGATIVE,
        "task_weight": NON_NEGATIVE,
        "macs_weight": NON_NEGATIVE,
    }
    """Each key's range (checked by :meth:`Config.validate` with every other key's)."""

    def check(self, cfg: Config) -> None:
        """The section's rules between its keys (``cfg``: the whole config; see :meth:`Config.validate`)."""
        if not 0 < self.tau_end <= self.tau_start:
            raise ConfigError(f"stage2 needs 0 < tau_end <= tau_start, got {self.tau_end} and {self.tau_start}")
