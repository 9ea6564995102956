"""Arch and SearchSpace: the names of subnets.

An :class:`Arch` is an immutable, hashable, JSON-serialisable mapping ``dim name -> int`` that
names one subnet of a supernet (the width of each stage, a kernel size, a depth, ...). The
supernet's forward takes it explicitly: ``net(x, arch)``. There is no mode flag anywhere.

A :class:`SearchSpace` is the ordered set of dimensions of one supernet, each with its sorted
tuple of allowed values. Dimensions can be *tied* so that they always move together (DS-MBNet's
s3 and s4 widths share one index of their 14-option grids).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

DimKind = Literal["width", "kernel", "depth"]
Rng = random.Random | torch.Generator | int


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never dropping more than 10%.

    The rule of the MobileNet family (and of DS-Net's width grids): channel counts that are
    multiples of 8 map well onto SIMD lanes and tensor cores.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def width_grid(max_channels: int, ratios: Iterable[float], divisor: int = 8) -> tuple[int, ...]:
    """The sorted distinct channel counts ``make_divisible(r * max_channels)`` for ``ratios``.

    The largest entry is always ``max_channels`` itself, so the largest subnet is the full net.
    """
    grid = {min(max_channels, make_divisible(r * max_channels, divisor)) for r in ratios}
    grid.add(max_channels)
    return tuple(sorted(grid))


def dsnet_ratios() -> tuple[float, ...]:
    """DS-Net's slimming ratios rho in [0.35 : 0.05 : 1.0] (14 choices)."""
    return tuple(round(0.35 + 0.05 * i, 2) for i in range(14))


class Arch(Mapping[str, int]):
    """One subnet: an immutable mapping ``dimension name -> value``.

    Hashable (usable as a dict key, e.g. in PSS pools) and JSON round-trippable.
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, values: Mapping[str, int] | Iterable[tuple[str, int]] = (), **kw: int):
        items = dict(values)
        items.update(kw)
        for k, v in items.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v:
                raise ValueError(f"Arch value for {k!r} must be an integer, got {v!r}")
        self._items = tuple((str(k), int(v)) for k, v in items.items())
        self._hash = hash(frozenset(self._items))

    def __getitem__(self, key: str) -> int:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Arch):
            return self._hash == other._hash and dict(self._items) == dict(other._items)
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return "Arch(" + ", ".join(f"{k}={v}" for k, v in self._items) + ")"

    def replace(self, **changes: int) -> Arch:
        """A copy with some dimensions changed (validate it against a space before use)."""
        unknown = set(changes) - set(self)
        if unknown:
            raise KeyError(f"Arch has no dimension(s) {sorted(unknown)}; it has {list(self)}")
        return Arch({**dict(self._items), **changes})

    def to_dict(self) -> dict[str, int]:
        return dict(self._items)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Arch:
        return cls(json.loads(text))


@dataclass(frozen=True)
class Dim:
    """One searchable dimension.

    ``kind`` says how generic code treats it: ``width`` dimensions (channels, heads, MLP units)
    scale under :meth:`SearchSpace.uniform`; ``kernel`` and ``depth`` stay at their maximum
    there. MAC counting treats ``depth`` as categorical (see :mod:`dynaslice.counting`).
    """

    name: str
    choices: tuple[int, ...]
    kind: DimKind = "width"

    def __post_init__(self) -> None:
        choices = tuple(int(c) for c in self.choices)
        if not choices:
            raise ValueError(f"dimension {self.name!r} has no choices")
        if any(c <= 0 for c in choices):
            raise ValueError(f"dimension {self.name!r} has non-positive choices {choices}")
        if self.kind not in ("width", "kernel", "depth"):
            raise ValueError(f"dimension {self.name!r}: unknown kind {self.kind!r}")
        object.__setattr__(self, "choices", tuple(sorted(set(choices))))

    @property
    def max(self) -> int:
        return self.choices[-1]

    @property
    def min(self) -> int:
        return self.choices[0]


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of one supernet and which of them are tied together.

    Tied dimensions always take the same *index* into their (equally long) choice tuples.
    """

    dims: tuple[Dim, ...]
    tied: tuple[tuple[str, ...], ...] = ()
    _by_name: dict[str, Dim] = field(init=False, repr=False, compare=False)
    groups: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)
    # archs already validated: makes the check in every forward O(1); bounded, a pure cache
    _valid: set[Arch] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "tied", tuple(tuple(g) for g in self.tied))
        by_name = {d.name: d for d in self.dims}
        if len(by_name) != len(self.dims):
            raise ValueError("duplicate dimension names in search space")
        seen: set[str] = set()
        for group in self.tied:
            for name in group:
                if name not in by_name:
                    raise ValueError(f"tied dimension {name!r} is not in the space")
                if name in seen:
                    raise ValueError(f"dimension {name!r} is tied twice")
                seen.add(name)
            if len({len(by_name[n].choices) for n in group}) != 1:
                raise ValueError(f"tied dimensions {group} must have equally many choices")
        groups = [g for g in self.tied] + [(d.name,) for d in self.dims if d.name not in seen]
        groups.sort(key=lambda g: [d.name for d in self.dims].index(g[0]))
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "groups", tuple(groups))
        object.__setattr__(self, "_valid", set())

    # --- construction helpers -------------------------------------------------------------
    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> SearchSpace:
        dims = tuple(Dim(d["name"], tuple(d["choices"]), d.get("kind", "width")) for d in spec["dims"])
        return cls(dims, tuple(tuple(g) for g in spec.get("tied", ())))

    def to_dict(self) -> dict[str, Any]:
        return {
            "dims": [{"name": d.name, "choices": list(d.choices), "kind": d.kind} for d in self.dims],
            "tied": [list(g) for g in self.tied],
        }

    # --- queries ----------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims)

    def __getitem__(self, name: str) -> Dim:
        return self._by_name[name]

    def __len__(self) -> int:
        """Number of distinct archs in the space."""
        return math.prod(self.group_sizes())

    def group_sizes(self) -> tuple[int, ...]:
        """Number of choices of each group (in :attr:`groups` order): what :meth:`from_indices` indexes."""
        return tuple(len(self._by_name[g[0]].choices) for g in self.groups)

    def from_indices(self, indices: Sequence[int]) -> Arch:
        """The arch taking grid index ``indices[j]`` in every dimension of group ``j``.

        ``groups`` lists the dimensions that move together (tied ones share a group; every other
        dimension is a group of its own), so any index vector is a valid arch: what samplers that
        draw per-dimension indices (PSS-Net) use.
        """
        values: dict[str, int] = {}
        for group, i in zip(self.groups, indices, strict=True):
            for name in group:
                values[name] = self._by_name[name].choices[i]
        return Arch((n, values[n]) for n in self.names)

    def largest(self) -> Arch:
        return self.from_indices([n - 1 for n in self.group_sizes()])

    def smallest(self) -> Arch:
        return self.from_indices([0] * len(self.groups))

    def narrowest_ratio(self) -> float:
        """The smallest ``min / max`` over the width dimensions: the narrowest uniform ratio there is."""
        ratios = [d.min / d.max for d in self.dims if d.kind == "width" and len(d.choices) > 1]
        return min(ratios, default=1.0)

    def lowest_ratio(self) -> float:
        """The smallest ratio :meth:`uniform` takes: 10% below :meth:`narrowest_ratio`, so that the
        nominal ratios of a rounded grid (x0.35 where the narrowest widths are 0.34 of the widest)
        name its narrowest subnet."""
        return 0.9 * self.narrowest_ratio()

    def uniform(self, ratio: float) -> Arch:
        """Every width dimension at ``ratio`` of its maximum, rounded to the nearest grid value.

        Kernel and depth dimensions stay at their maximum. Ties follow the group's first
        dimension. A ratio below :meth:`lowest_ratio` is refused rather than silently rounded up
        to the narrowest subnet (a table row "x0.1" must be that wide).
        """
        lowest = self.lowest_ratio()
        if not (0 < ratio <= 1 and ratio >= lowest):
            shown = math.ceil(round(lowest * 100, 6)) / 100  # a ratio the message names is accepted
            raise ValueError(
                f"uniform width ratio {ratio:g} is outside {shown:.2f}..1, the ratios this space has "
                f"(its narrowest widths are {self.narrowest_ratio():.2f} of each maximum, and ratios "
                f"from {shown:.2f} round to them: smallest())"
            )
        indices = []
        for group in self.groups:
            dim = self._by_name[group[0]]
            if dim.kind != "width":
                indices.append(len(dim.choices) - 1)
                continue
            target = ratio * dim.max
            # nearest grid value; on a tie take the wider one (never under-provision)
            best = min(range(len(dim.choices)), key=lambda i: (abs(dim.choices[i] - target), -i))
            indices.append(best)
        return self.from_indices(indices)

    def sample(self, rng: Rng) -> Arch:
        """A uniformly random arch. ``rng``: a ``random.Random``, ``torch.Generator`` or seed."""
        if isinstance(rng, int):
            rng = random.Random(rng)
        sizes = self.group_sizes()
        if isinstance(rng, torch.Generator):
            idx = [int(torch.randint(n, (1,), generator=rng)) for n in sizes]
        elif isinstance(rng, random.Random):
            idx = [rng.randrange(n) for n in sizes]
        else:
            raise TypeError(f"rng must be random.Random, torch.Generator or int, got {type(rng)}")
        return self.from_indices(idx)

    def __iter__(self) -> Iterator[Arch]:
        """Enumerate every arch (in index order; mind ``len(space)`` before listing it)."""
        for idx in itertools.product(*(range(n) for n in self.group_sizes())):
            yield self.from_indices(idx)

    def __contains__(self, arch: object) -> bool:
        try:
            self.validate(arch)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return False
        return True

    def validate(self, arch: Mapping[str, int]) -> Arch:
        """Return ``arch`` as an :class:`Arch` of this space, or raise a ValueError saying why."""
        if isinstance(arch, Arch) and arch in self._valid:
            return arch
        if not isinstance(arch, Mapping):
            raise TypeError(f"expected an Arch (or a dict of dimension -> int), got {type(arch).__name__}")
        missing = [n for n in self.names if n not in arch]
        extra = [k for k in arch if k not in self._by_name]
        if missing or extra:
            raise ValueError(
                f"Arch does not match the search space: missing {missing}, unexpected {extra}; "
                f"dimensions are {list(self.names)}"
            )
        for dim in self.dims:
            value = arch[dim.name]
            if value not in dim.choices:
                raise ValueError(
                    f"Arch value {dim.name}={value} is not allowed; allowed values are {list(dim.choices)}"
                )
        for group in self.tied:
            idx = {self._by_name[n].choices.index(arch[n]) for n in group}
            if len(idx) > 1:
                vals = {n: arch[n] for n in group}
                raise ValueError(f"tied dimensions {vals} must use the same grid index")
        out = Arch((n, arch[n]) for n in self.names)
        if len(self._valid) > 100_000:
            self._valid.clear()
        self._valid.add(out)
        return out

    def index(self, arch: Mapping[str, int]) -> tuple[int, ...]:
        """Grid index of each dimension of ``arch`` (in ``names`` order)."""
        arch = self.validate(arch)
        return tuple(self._by_name[n].choices.index(arch[n]) for n in self.names)
