"""Arch samplers: which subnets one training step runs.

The loop only knows this small interface, so new strategies (PSS's prioritized pools) plug in
without touching it:

- ``sample(step) -> list[Arch]``: the subnets of global step ``step``, in the order they run.
  It must be a pure function of ``step`` and the sampler's state, so that every DDP rank (which
  holds an identical copy of the sampler) draws the same subnets and a resumed run redraws them.
- ``observe(arch, loss)``: feedback after the step, called on every rank with the loss of each
  sampled subnet *averaged over ranks*, so state that depends on it stays identical everywhere.
- ``state_dict()`` / ``load_state_dict()``: plain Python data (lists, dicts, numbers, strings,
  tensors) that goes into checkpoints and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..config_base import ConfigError
from ..registry import Registry
from ..seeding import derive_seed
from ..space import Arch, SearchSpace
from .config import Config, ConfigCheck, register_check

if TYPE_CHECKING:  # pragma: no cover
    from .supernet import SupernetTrainer


@runtime_checkable
class ArchSampler(Protocol):
    def sample(self, step: int) -> list[Arch]: ...

    def observe(self, arch: Arch, loss: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SandwichSampler:
    """The sandwich rule: largest, smallest, then ``n - 2`` uniformly random subnets.

    The random ones come from an RNG seeded by ``(seed, step)`` only: all ranks agree without
    communicating, and a resumed run draws the same subnets. Stateless beyond the seed.

    ``uniform=True`` draws the random subnets among the *uniform-width* ones instead
    (``space.uniform(r)``, ``r`` uniform between the narrowest grid ratio and 1; slimmable
    networks' choice): for a supernet deployed only at uniform widths, those get every update.
    """

    def __init__(self, space: SearchSpace, n: int = 4, seed: int = 0, uniform: bool = False):
        if n < 2:
            raise ValueError(f"the sandwich rule needs n >= 2 subnets (largest and smallest), got {n}")
        self.space, self.n, self.seed, self.uniform = space, n, seed, uniform
        widths = [d for d in space.dims if d.kind == "width"]
        self.min_ratio = min((d.min / d.max for d in widths), default=1.0)

    def _random(self, rng: random.Random) -> Arch:
        if self.uniform:
            return self.space.uniform(rng.uniform(self.min_ratio, 1.0))
        return self.space.sample(rng)

    def sample(self, step: int) -> list[Arch]:
        rng = random.Random(derive_seed("sandwich", self.seed, step))
        return [self.space.largest(), self.space.smallest()] + [self._random(rng) for _ in range(self.n - 2)]

    def observe(self, arch: Arch, loss: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        state = {"kind": "sandwich", "n": self.n, "seed": self.seed}
        return {**state, "uniform": True} if self.uniform else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state != self.state_dict():
            raise ValueError(
                f"sampler state {state} does not belong to SandwichSampler(n={self.n}, seed={self.seed}, "
                f"uniform={self.uniform})"
            )


class FixedSampler:
    """Always the same subnet(s): a static network (one arch) or a fixed list, e.g. a baseline."""

    def __init__(self, *archs: Arch):
        if not archs:
            raise ValueError("FixedSampler needs at least one arch")
        self.archs = list(archs)

    def sample(self, step: int) -> list[Arch]:
        return list(self.archs)

    def observe(self, arch: Arch, loss: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "archs": [a.to_dict() for a in self.archs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "fixed" or [Arch(a) for a in state.get("archs", [])] != self.archs:
            raise ValueError(f"sampler state {state} does not belong to FixedSampler({self.archs})")


# --------------------------------------------------------------------------- the registry

SamplerBuilder = Callable[["SupernetTrainer"], ArchSampler]


@dataclass(frozen=True)
class _Sampler:
    build: SamplerBuilder
    check: ConfigCheck | None


_SAMPLERS: Registry[_Sampler] = Registry("sampler")


def register_sampler(name: str, *, check: ConfigCheck | None = None) -> Callable[[SamplerBuilder], SamplerBuilder]:
    """Register ``builder(trainer) -> ArchSampler`` under ``name`` (the value of ``train.sampler``).

    The builder reads what it needs from the trainer (``trainer.space``, ``trainer.cfg.train``,
    ``trainer.total_steps``, ``trainer.net``) and may add a :class:`~dynaslice.train.engine.Callback`
    to ``trainer.callbacks`` for work at the end of training (PSS-Net selects its budget table).
    ``check(cfg)``: the sampler's own rules between config keys (raising :class:`ConfigError`),
    run by every :meth:`Config.validate` whose ``train.sampler`` is ``name``: a new sampler
    brings its rules with it instead of editing the config module.
    """

    def register(builder: SamplerBuilder) -> SamplerBuilder:
        _SAMPLERS.add(name, _Sampler(builder, check))
        return builder

    return register


def sampler_names() -> tuple[str, ...]:
    return _SAMPLERS.names()


def build_sampler(name: str, trainer: SupernetTrainer) -> ArchSampler:
    return _SAMPLERS.get(name).build(trainer)


@register_check
def _check_sampler(cfg: Config) -> None:
    """``train.sampler`` names a registered sampler, and the config meets that sampler's rules."""
    _SAMPLERS.check_config(cfg, cfg.train.sampler, "train.sampler", ConfigError)


def need_subnets(cfg: Config, n: int, which: str) -> None:
    """A sampler's rule: ``train.num_subnets >= n`` (``which``: the subnets it always runs)."""
    t = cfg.train
    if t.num_subnets < n:
        raise ConfigError(
            f"train.num_subnets={t.num_subnets} is too small: train.sampler={t.sampler} needs >= {n} ({which})"
        )


@register_sampler("sandwich", check=lambda cfg: need_subnets(cfg, 2, "largest and smallest"))
def _sandwich(trainer: SupernetTrainer) -> SandwichSampler:
    t = trainer.cfg.train
    return SandwichSampler(trainer.space, t.num_subnets, seed=t.seed, uniform=t.sandwich_uniform)


@register_sampler("fixed")
def _fixed(trainer: SupernetTrainer) -> FixedSampler:
    width = trainer.cfg.train.fixed_width
    try:
        return FixedSampler(trainer.space.uniform(width))
    except ValueError as e:
        raise ValueError(f"train.fixed_width={width}: {e}") from None
