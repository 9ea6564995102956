"""The pruning methods' registry: every method plugs into ``dynaslice prune`` the same way.

A method is one function ``run(ctx: PruneContext) -> PruneResult`` registered under its name
(the CLI's METHOD, ``prune.method``) in its own module::

    @register_pruner("l1", budget="channels", trains_base=True)
    def _l1(ctx: PruneContext) -> PruneResult:
        return prune_l1(ctx.model, ctx.input_size, target_macs=ctx.target_macs, ...)

and that module is imported by the package's ``__init__``. What the registration declares is
all :func:`~dynaslice.prune.run.prune_run` needs to know about a method, so adding one touches
no other file: ``budget`` says which budget the method prunes to (``"channels"``: exactly one of
``prune.target_macs`` / ``prune.target_params``, limited to ``targets``; ``"sparsity"``:
``prune.sparsity``, no MACs or parameter target), ``trains_base`` whether it starts from the full
network trained ``train.epochs - prune.finetune_epochs`` epochs (``RUN/base``) rather than the
untrained one, ``include`` the channel groups it prunes when ``prune.include`` is null,
``check(cfg)`` its own rules on the config (run whenever a config choosing it is loaded, before
any training) and ``note(cfg)`` advice ``dynaslice prune`` prints before the run (or None).
The CLI's choices and the config's allowed ``prune.method`` values are :func:`pruner_names`.
Samplers (:func:`dynaslice.train.samplers.register_sampler`) and training targets
(:func:`dynaslice.train.targets.register_target`) register the same way: a name, the keywords
their kind declares, and an optional ``check``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from torch import nn

from ..config_base import ConfigError
from ..registry import Registry
from ..train.config import ConfigCheck, register_check
from .common import PruneResult

if TYPE_CHECKING:  # pragma: no cover
    from ..train.config import Config

__all__ = ["PruneContext", "PruningMethod", "pruner", "pruner_names", "register_pruner"]

Budget = Literal["channels", "sparsity"]
TARGET_KINDS = ("macs", "params")
"""The channel budgets a method may accept: ``prune.target_macs``, ``prune.target_params``."""


@dataclass(frozen=True)
class PruneContext:
    """Everything one pruning run hands its method (one signature for every method).

    ``model``: the full network as a plain model, untrained, or, for a method registered with
    ``trains_base=True``, trained for ``train.epochs - prune.finetune_epochs`` epochs (in
    ``RUN/base``); the method must not modify it. ``target_macs`` / ``target_params``: the
    budget as absolute counts (the config's fractions resolved against ``model``), at most one
    set, both None for a sparsity method. ``include``: ``prune.include`` or the method's default.
    """

    cfg: Config
    model: nn.Module
    input_size: tuple[int, ...]
    num_classes: int
    run_dir: Path
    resume: bool
    target_macs: int | None
    target_params: int | None
    include: str


PruneFn = Callable[[PruneContext], PruneResult]


@dataclass(frozen=True)
class PruningMethod:
    """A registered method: its function and what it declares (see the module docstring)."""

    name: str
    run: PruneFn
    budget: Budget
    trains_base: bool
    include: str = "internal"
    targets: tuple[str, ...] = TARGET_KINDS
    check: ConfigCheck | None = None
    note: Callable[[Config], str | None] | None = None


_PRUNERS: Registry[PruningMethod] = Registry("pruning method")


def register_pruner(
    name: str,
    *,
    budget: Budget,
    trains_base: bool,
    include: str = "internal",
    targets: tuple[str, ...] = TARGET_KINDS,
    check: ConfigCheck | None = None,
    note: Callable[[Config], str | None] | None = None,
) -> Callable[[PruneFn], PruneFn]:
    """Register ``run(ctx) -> PruneResult`` as the pruning method ``name`` (see the module docstring).

    A name registered twice is an error: two modules claiming one method name would make which
    one runs depend on import order.
    """
    if budget not in ("channels", "sparsity"):
        raise ValueError(f"pruning method {name!r}: budget must be 'channels' or 'sparsity', got {budget!r}")
    if not targets or not set(targets) <= set(TARGET_KINDS):
        raise ValueError(f"pruning method {name!r}: targets must be some of {TARGET_KINDS}, got {targets!r}")

    def register(run: PruneFn) -> PruneFn:
        _PRUNERS.add(name, PruningMethod(name, run, budget, trains_base, include, tuple(targets), check, note))
        return run

    return register


def pruner_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order (the CLI's METHOD choices)."""
    return _PRUNERS.names()


def pruner(name: str) -> PruningMethod:
    """The method registered as ``name``, or a ConfigError naming the registered ones."""
    return _PRUNERS.get(name, ConfigError, "prune.method")


@register_check
def _check_method(cfg: Config) -> None:
    """``prune.method`` names a registered method, and the config meets that method's rules."""
    _PRUNERS.check_config(cfg, cfg.prune.method, "prune.method", ConfigError)
