"""One registry type for every kind of pluggable method (pruning methods, samplers, training
targets, binary methods): a name -> entry table that refuses a name registered twice (which
module's method runs would otherwise depend on import order) and names the registered choices
when asked for an unknown one. Each kind keeps its own decorator (``register_pruner``,
``register_sampler``, ``register_target``, ``register_binary``) declaring what that kind needs;
this is only the table they share.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

E = TypeVar("E")


class Registry(Generic[E]):
    """Entries of one ``kind`` ("sampler", "pruning method", ...) by name, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, E] = {}

    def add(self, name: str, entry: E) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry

    def copy(self) -> Registry[E]:
        """A separate table with the same entries (a test registers a toy method in it)."""
        other: Registry[E] = Registry(self.kind)
        other._entries = dict(self._entries)
        return other

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str, error: type[Exception] = ValueError, key: str | None = None) -> E:
        """The entry ``name``; else ``error`` naming the choices (``key``: the config key the name
        came from, as in ``train.sampler='x' is not one of ...``)."""
        if name not in self._entries:
            choices = ", ".join(self._entries)
            if key is not None:
                raise error(f"{key}={name!r} is not one of {choices}")
            raise error(f"unknown {self.kind} {name!r}: choose one of {choices}")
        return self._entries[name]

    def check_config(self, cfg: Any, name: str, key: str, error: type[Exception]) -> None:
        """The config ``cfg`` chooses ``name`` at ``key``: it must be registered (else ``error``),
        and the config must meet the entry's own ``check(cfg)`` rules, if it has any."""
        check = getattr(self.get(name, error, key), "check", None)
        if check is not None:
            check(cfg)
