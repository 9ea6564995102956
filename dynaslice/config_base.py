"""The bottom of the config machinery: :class:`ConfigError`, :func:`load_yaml` (the one reader
of YAML a user wrote) and the value ranges a section's keys are checked against (:data:`Rule`).

It imports nothing from dynaslice, so that every package can define its own config section
next to the code that uses it (``dynaslice.train.stage2_settings``, ...) and the aggregate
:class:`~dynaslice.train.config.Config` can import those sections without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override the user has to fix (printed as one line by the CLI)."""



# --------------------------------------------------------------------------- reading YAML

MAX_YAML_DEPTH = 32
"""Deeper than any config (``model.gate.routes`` is 4 levels); PyYAML overflows its recursion near 300."""
MAX_YAML_VALUES = 10_000
"""More values than any config holds (a few hundred); PyYAML composes some 30k a second."""


class _Refused(Exception):
    """A YAML document refused while it is composed (the message follows the document's name)."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses aliases, and documents nested deeper than
    :data:`MAX_YAML_DEPTH` or holding more than :data:`MAX_YAML_VALUES` values, node by node
    while it composes them: before anything is built from the document or validated."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.depth, self.values = 0, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        where = f"line {event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                f"uses the YAML alias *{event.anchor} ({where}): anchors and aliases are not accepted "
                "in configs; write the value out"
            )
        self.values += 1
        if self.values > MAX_YAML_VALUES:
            raise _Refused(f"holds more than {MAX_YAML_VALUES} values ({where}); a config holds a few hundred")
        if self.depth >= MAX_YAML_DEPTH:
            raise _Refused(f"nests deeper than {MAX_YAML_DEPTH} levels ({where})")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(text: str, source: str) -> Any:
    """The value of YAML a user wrote (a config file, a ``--set`` value), or one ConfigError
    line that starts with ``source`` (what the text is, e.g. the file's name).

    The one reader of such YAML in dynaslice. It refuses aliases, because 800 bytes of nested
    aliases (``&a [*a, *a, ...]``, 8 levels of 10) stand for 1e9 values that the config checks
    then walk one by one (a hang), and a self-referencing one (``&a [*a]``) is a list that
    contains itself; depth and size are capped, because a 100k-deep document overflows PyYAML's
    recursion (a ``RecursionError``, not a ``YAMLError``) and one too large takes minutes.
    """
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as e:
        raise ConfigError(f"{source} {e}") from None
    except yaml.MarkedYAMLError as e:
        line = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        what = e.problem or e.context or str(e).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML: {what}{line}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {str(e).splitlines()[0]}") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- value ranges

Rule = tuple[Callable[[Any], bool], str]
"""The range of one config key: ``(ok(value), the rule said to the user when not ok)``."""


def whole(lo: int, note: str = "") -> Rule:
    """A whole number >= ``lo`` (``note``: what the smallest value means, shown with the rule)."""
    return (lambda v: v >= lo), f"use a whole number >= {lo}{note}"


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A value in ``[lo, hi]``, either end open on request."""

    def ok(v: float) -> bool:
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok, f"use a value in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


POSITIVE: Rule = ((lambda v: v > 0), "use a value > 0")
NON_NEGATIVE: Rule = ((lambda v: v >= 0), "use a value >= 0")
