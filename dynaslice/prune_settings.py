"""The ``prune`` config section of ``dynaslice prune`` (:mod:`dynaslice.prune`).

It sits beside the ``prune`` package, not inside it, on purpose: importing any module of the
package runs ``prune/__init__``, which imports the pruning methods, which import the training
engine and so ``dynaslice.train.config``; the aggregate :class:`dynaslice.train.config.Config`
imports this section, so from inside the package that would be an import cycle (``import
dynaslice.train`` fails while ``train.config`` is half loaded). Here it imports only
:mod:`dynaslice.config_base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config_base import ConfigError

if TYPE_CHECKING:
    from .train.config import Config


@dataclass
class PruneConfig:
    """``dynaslice prune METHOD`` (:mod:`dynaslice.prune`): one compact network from the config's
    model (its largest subnet as a plain network), trained ``train.epochs`` epochs in all.

    - ``method``: the CLI's METHOD, recorded so that a resumed run cannot switch methods.
    - ``finetune_epochs`` (fractions allowed) of the budget fine-tune the pruned network at
      ``finetune_lr`` (cosine, no warm-up): l1, random, onexn and magnitude prune the full network
      trained ``train.epochs - finetune_epochs`` epochs; White-Box trains its masks with the
      network that long. DCFF and scratch train the compact network all ``train.epochs``.
    - ``target_macs`` / ``target_params`` (channel pruning: dcff, whitebox, l1, random, scratch;
      exactly one, the other null): the compact network's budget, a fraction (<= 1) of the full
      network's or an absolute count. ``include``: the channel groups pruned, ``internal``
      (block-inner widths) or ``all`` (residual streams too); null: the method's own default.
    - onexn / magnitude: ``sparsity`` of each conv's weights (but the stem) in blocks of ``n``
      output kernels (``rearrange``: sort filters by L1 norm first) / unstructured.
    - White-Box: mask regulariser ``lam``, at least ``min_keep`` of each layer's channels.
    - DCFF: temperature from ``t_start`` to ``t_end`` with steepness ``k`` per epoch, the fusion
      recomputed ``updates_per_epoch`` times per epoch (the official schedule: ``k = 1``, once).
    - jackpot (:mod:`dynaslice.prune.jackpot`): ``sparsity`` of the weights by one global threshold,
      the mask searched over the frozen base for ``finetune_epochs - tune_epochs``, its scores
      started by ``score_init`` (magnitude, uniform or random); ``tune_epochs`` then train the weights.
    """

    method: str = "l1"
    target_macs: float | None = None
    target_params: float | None = None
    include: str | None = None
    finetune_epochs: float = 0.25
    finetune_lr: float = 0.01
    n: int = 4
    sparsity: float = 0.5
    rearrange: bool = True
    lam: float = 5e-4
    min_keep: float = 0.3
    t_start: float = 1.0
    t_end: float = 1e4
    k: float = 1.0
    updates_per_epoch: int = 1
    score_init: str = "magnitude"
    tune_epochs: float = 0.0

    def check(self, cfg: Config) -> None:
        """The section's rules (``cfg``: the whole config, whose ``train.epochs`` is the budget).
        ``method`` and each method's own settings are checked by the pruning registry, which knows
        the methods (:func:`register_check`)."""
        epochs = cfg.train.epochs
        if self.include not in (None, "internal", "all"):
            raise ConfigError(f"prune.include={self.include!r} is not one of internal, all (or null)")
        if not 0 < self.finetune_epochs < epochs:
            raise ConfigError(
                f"prune.finetune_epochs must lie between 0 and train.epochs ({epochs}), got {self.finetune_epochs}"
            )
        for key in ("target_macs", "target_params"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"prune.{key} must be > 0 (a fraction <= 1 or an amount), got {value}")
        if not 0 <= self.sparsity < 1 or not 0 <= self.min_keep <= 1:
            raise ConfigError(
                f"prune.sparsity must lie in [0, 1) and prune.min_keep in [0, 1], got {self.sparsity} and {self.min_keep}"
            )
        if self.n < 1 or self.updates_per_epoch < 1 or self.finetune_lr <= 0 or self.lam < 0:
            raise ConfigError("prune.n and prune.updates_per_epoch must be >= 1, prune.finetune_lr > 0, prune.lam >= 0")
        if not 0 < self.t_start <= self.t_end or self.k <= 0:
            raise ConfigError(f"prune needs 0 < t_start <= t_end and k > 0, got {self.t_start}, {self.t_end}, {self.k}")
