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
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..seeding import derive_seed
from ..space import Arch, SearchSpace

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
    """

    def __init__(self, space: SearchSpace, n: int = 4, seed: int = 0):
        if n < 2:
            raise ValueError(f"the sandwich rule needs n >= 2 subnets (largest and smallest), got {n}")
        self.space, self.n, self.seed = space, n, seed

    def sample(self, step: int) -> list[Arch]:
        rng = random.Random(derive_seed("sandwich", self.seed, step))
        return [self.space.largest(), self.space.smallest()] + [
            self.space.sample(rng) for _ in range(self.n - 2)
        ]

    def observe(self, arch: Arch, loss: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sandwich", "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sandwich" or state.get("n") != self.n or state.get("seed") != self.seed:
            raise ValueError(
                f"sampler state {state} does not belong to SandwichSampler(n={self.n}, seed={self.seed})"
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
_SAMPLERS: dict[str, SamplerBuilder] = {}


def register_sampler(name: str) -> Callable[[SamplerBuilder], SamplerBuilder]:
    """Register ``builder(trainer) -> ArchSampler`` under ``name`` (the value of ``train.sampler``).

    The builder reads what it needs from the trainer (``trainer.space``, ``trainer.cfg.train``,
    ``trainer.total_steps``, ``trainer.net``) and may add a :class:`~dynaslice.train.engine.Callback`
    to ``trainer.callbacks`` for work at the end of training (PSS-Net selects its budget table).
    """

    def register(builder: SamplerBuilder) -> SamplerBuilder:
        if name in _SAMPLERS:
            raise ValueError(f"sampler {name!r} registered twice")
        _SAMPLERS[name] = builder
        return builder

    return register


def sampler_names() -> tuple[str, ...]:
    return tuple(_SAMPLERS)


def build_sampler(name: str, trainer: SupernetTrainer) -> ArchSampler:
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(_SAMPLERS)}")
    return _SAMPLERS[name](trainer)


@register_sampler("sandwich")
def _sandwich(trainer: SupernetTrainer) -> SandwichSampler:
    t = trainer.cfg.train
    return SandwichSampler(trainer.space, t.num_subnets, seed=t.seed)


@register_sampler("fixed")
def _fixed(trainer: SupernetTrainer) -> FixedSampler:
    return FixedSampler(trainer.space.uniform(trainer.cfg.train.fixed_width))
