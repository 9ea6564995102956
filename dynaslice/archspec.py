"""Arch strings: the one reading of a subnet named in text, for every command and ``serve.load``.

A subnet is named the same way wherever a user names one (``dynaslice export --arch``,
``dynaslice eval --archs``, ``serve.load(arch=...)``): one parser, so a form documented for
one place works in every other, and reads as the same arch there.

One arch (:func:`parse_arch`) is any of:

- ``largest`` / ``smallest``;
- a uniform width ratio ``x0.5`` or ``0.5`` (a number too): :meth:`SearchSpace.uniform`;
- ``routeN``: route N of a gated net, narrowest first;
- a JSON arch, inline (``{"w0": 16, ...}``) or a ``.json`` file holding one;
- an arch mapping (from Python).

Several (:func:`parse_archs`) adds ``uniform`` (the given default widths), ``routes`` (every
route of a gated net) and a ``.json`` file holding a list of archs or a ``{name: arch}``
mapping. Every mistake is one ValueError naming the forms, which the CLI prints as one line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import safejson
from .gate import GatedSupernet
from .models.base import Supernet
from .space import Arch

ARCH_FORMS = "largest, smallest, a width ratio like x0.5 or 0.5, routeN, or a JSON arch (inline or a file)"
ARCHS_FORMS = f"uniform, routes, {ARCH_FORMS}, or a .json file of archs"


def uniform_archs(net: Supernet, widths: Sequence[float]) -> dict[str, Arch]:
    """``{"x0.5": arch, ...}``: the uniform-width subnets (every width dimension at ratio ``w``)."""
    return {f"x{w:g}": net.space.uniform(w) for w in widths}


def parse_arch(spec: str | float | Mapping[str, int], net: Supernet, flag: str = "--arch") -> Arch:
    """The one arch that ``spec`` names in ``net`` (forms: the module docstring); ``flag`` names
    the option in messages. Raises ValueError (or OSError for an unreadable file) saying why."""
    if isinstance(spec, Mapping):
        return net.space.validate(spec)
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return net.space.uniform(_ratio(str(spec), net, flag))
    if not isinstance(spec, str):
        raise ValueError(f"{flag} {spec!r}: use {ARCH_FORMS}")
    text = spec.strip()
    if text in ("largest", "smallest"):
        return getattr(net.space, text)()
    if text.startswith("{"):
        try:
            return net.space.validate(safejson.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} {spec!r} is not valid JSON: {e}") from None
    if text.startswith("route") and text[5:].isdigit():
        return _route(text, net, flag)
    if text.endswith(".json"):
        data = _read_json(text, "an arch")
        if _is_one_arch(data):
            return net.space.validate(data)
        archs = _archs_from_json(text, data, net)
        if len(archs) != 1:
            raise ValueError(f"{flag} {spec!r} names {len(archs)} subnets; give exactly one")
        return next(iter(archs.values()))
    if text in ("uniform", "routes"):
        raise ValueError(f"{flag} {spec!r} names several subnets (that is --archs of eval); use {ARCH_FORMS}")
    return net.space.uniform(_ratio(text, net, flag))


def parse_archs(
    tokens: Sequence[str], net: Supernet, default_widths: Sequence[float], flag: str = "--archs"
) -> dict[str, Arch]:
    """``{name: arch}`` for ``tokens``: each a form of :func:`parse_arch` (named by itself; a
    ratio by its ``x0.5`` name), ``uniform`` (``default_widths``), ``routes`` (a gated net's
    routes), or a ``.json`` file of a list of archs (``arch0``, ...) or a ``{name: arch}`` mapping."""
    archs: dict[str, Arch] = {}
    for token in tokens:
        text = token.strip()
        if text == "routes":
            if not isinstance(net, GatedSupernet):
                raise ValueError(f"{flag} routes needs a gated checkpoint (trained with model.gate.enabled=true)")
            archs.update(net.named_routes())
        elif text == "uniform":
            archs.update(uniform_archs(net, default_widths))
        elif text.endswith(".json") and not _is_one_arch(data := _read_json(text, "archs")):
            archs.update(_archs_from_json(text, data, net))
        elif text in ("largest", "smallest") or text.startswith(("{", "route")) or text.endswith(".json"):
            archs[text] = parse_arch(text, net, flag)
        else:
            archs.update(uniform_archs(net, [_ratio(text, net, flag)]))
    return archs


def _is_one_arch(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(v, int) for v in data.values())


def _read_json(path: str, what: str) -> Any:
    try:
        return safejson.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {what} from {path}: {e}") from None


def _archs_from_json(path: str, data: Any, net: Supernet) -> dict[str, Arch]:
    if not isinstance(data, dict | list):
        raise ValueError(f"{path} must hold a list of archs or a {{name: arch}} mapping")
    items = data.items() if isinstance(data, dict) else ((f"arch{i}", a) for i, a in enumerate(data))
    try:
        return {str(name): net.space.validate(a) for name, a in items}
    except TypeError as e:  # an entry that is no arch at all (a number, a list)
        raise ValueError(f"{path} must hold a list of archs or a {{name: arch}} mapping: {e}") from None


def _route(text: str, net: Supernet, flag: str) -> Arch:
    if not isinstance(net, GatedSupernet):
        raise ValueError(f"{flag} {text}: routes belong to gated checkpoints; this one is not gated")
    r = int(text[5:])
    if r >= len(net.routes):
        raise ValueError(f"{flag} {text}: the gate has {len(net.routes)} routes (route0..route{len(net.routes) - 1})")
    return net.routes[r]


def _ratio(token: str, net: Supernet, flag: str) -> float:
    """A uniform width ratio (``x0.5`` or ``0.5``) this net has, or one line naming the accepted forms
    and the ratios there are (the ones :meth:`SearchSpace.uniform` takes)."""
    forms = ARCHS_FORMS if flag == "--archs" else ARCH_FORMS
    try:
        ratio = float(token.removeprefix("x"))
    except ValueError:
        raise ValueError(f"{flag} {token!r}: use {forms}") from None
    lowest, narrowest = net.space.lowest_ratio(), net.space.narrowest_ratio()
    if not lowest <= ratio <= 1:
        shown = math.ceil(round(lowest * 100, 6)) / 100  # a ratio the message names is accepted
        raise ValueError(
            f"{flag} {token!r}: width ratio {ratio:g} is outside {shown:.2f}..1, the ratios this network has "
            f"(x{shown:.2f} to x{narrowest:.2f} round to its narrowest widths, {narrowest:.2f} of the widest)"
            f"; use {forms}"
        )
    return ratio
