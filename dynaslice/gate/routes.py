"""Where a gate sits and which subnets it routes between.

The gate sits before stage ``cut`` (the family's default: :meth:`Supernet.default_gate_cut`).
Layers before it run at one fixed width shared by every route, so the routing space is a short,
MAC-sorted list of archs that agree on those dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..counting import count_macs
from ..models.base import Supernet
from ..space import Arch

ArchLike = Mapping[str, int]


def check_cut(net: Supernet, cut: int) -> None:
    if not 0 <= cut < net.n_stages:
        raise ValueError(
            f"gate cut {cut} is outside 0..{net.n_stages - 1}: the gate sits before one of the "
            f"{net.n_stages} stages of {type(net).__name__}"
        )


# --------------------------------------------------------------------------- routes


def validate_routes(
    net: Supernet, routes: Sequence[ArchLike], cut: int, input_size: Sequence[int] | None = None
) -> list[Arch]:
    """``routes`` as Archs of ``net``, checked: >= 2, the same pre-gate dims, strictly increasing MACs."""
    check_cut(net, cut)
    archs = [net.space.validate(r) for r in routes]
    if len(archs) < 2:
        raise ValueError(f"a gate needs at least 2 routes, got {len(archs)}")
    fixed = net.dims_before(cut)
    for i, a in enumerate(archs[1:], 1):
        differ = {d: (archs[0][d], a[d]) for d in fixed if a[d] != archs[0][d]}
        if differ:
            raise ValueError(
                f"route {i} differs from route 0 before the gate (cut {cut}) in {differ}; "
                "layers before the gate run at one width shared by every route"
            )
    macs = [int(m) for m in count_macs(net, archs, input_size)]
    for i in range(1, len(archs)):
        if macs[i] <= macs[i - 1]:
            raise ValueError(
                f"routes must be distinct and sorted by MACs (narrowest first); route {i} has "
                f"{macs[i]} MACs after route {i - 1} with {macs[i - 1]}"
            )
    return archs


def routes_even(
    net: Supernet,
    k: int,
    cut: int,
    pre_gate: Mapping[str, int] | None = None,
    input_size: Sequence[int] | None = None,
) -> list[Arch]:
    """The default routing space: ``k`` archs with MACs spread evenly from smallest to largest.

    Candidates are the uniform-width archs ``net.space.uniform(r)`` (every width dim at the same
    ratio; kernel/depth at max), with the dims before the gate (``net.dims_before(cut)``) set to
    ``pre_gate`` -- by default their largest values; a partial mapping leaves the rest at their
    largest. Route ``j`` is the candidate nearest to ``min + j * (max - min) / (k - 1)`` MACs
    (order kept, no repeats); the first and last are the narrowest and widest candidates.
    """
    check_cut(net, cut)
    if k < 2:
        raise ValueError(f"a gate needs at least 2 routes, got k={k}")
    space = net.space
    before = net.dims_before(cut)
    pre_gate = dict(pre_gate or {})
    extra = sorted(set(pre_gate) - set(before))
    if extra:
        raise ValueError(
            f"pre_gate names {extra}, which are not before the gate at cut {cut}: {list(before)}"
        )
    largest = space.largest()
    fixed = {d: pre_gate.get(d, largest[d]) for d in before}

    ratios = sorted({c / dim.max for dim in space.dims if dim.kind == "width" for c in dim.choices})
    candidates = list(dict.fromkeys(Arch({**space.uniform(r).to_dict(), **fixed}) for r in ratios))
    candidates = [space.validate(a) for a in candidates]
    macs = [int(m) for m in count_macs(net, candidates, input_size)]
    by_macs: dict[int, Arch] = {}
    for m, a in sorted(zip(macs, candidates, strict=True), key=lambda t: t[0]):
        by_macs.setdefault(m, a)  # equal MACs: keep the first (narrowest ratio) of them
    values, archs = list(by_macs), list(by_macs.values())
    if len(values) < k:
        raise ValueError(
            f"only {len(values)} distinct uniform-width routes exist after the gate at cut {cut}; "
            f"ask for k <= {len(values)} or pass explicit routes"
        )
    lo, hi = values[0], values[-1]
    picks = [0]
    for j in range(1, k - 1):
        target = lo + j * (hi - lo) / (k - 1)
        # stay strictly after the previous pick and leave room for the remaining picks
        allowed = range(picks[-1] + 1, len(values) - (k - 1 - j))
        picks.append(min(allowed, key=lambda i: abs(values[i] - target)))
    picks.append(len(values) - 1)
    return [archs[i] for i in picks]


