"""One generic registry: named implementations, loaded on first use.

Entries are objects or lazy ``"module:attr"`` strings, so naming a backend
never imports it (nor its native library) until it is chosen. Roles, models,
attention backends, transfer backends and router policies are all registries;
their CLI ``choices`` come from ``names()``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar, cast

T = TypeVar("T")


class UnknownName(ValueError):
    """A name no entry has; the message lists the known names."""


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: Mapping[str, T | str] | None = None):
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        for name, target in (entries or {}).items():
            self.add(name, target)

    def add(self, name: str, target: T | str) -> None:
        """Add an entry; a second, different entry under one name is an error."""
        known = self._entries.get(name)
        if known is not None and known is not target and not self._same(known, target):
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = target

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``."""

        def wrap(target: T) -> T:
            self.add(name, target)
            return target

        return wrap

    def get(self, name: str) -> T:
        try:
            target = self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None
        if isinstance(target, str):
            target = load(target)
            self._entries[name] = target
        return cast(T, target)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    @staticmethod
    def _same(known: object, target: object) -> bool:
        """A lazy entry and the object it names are one entry (the module registering itself)."""
        lazy, obj = (known, target) if isinstance(known, str) else (target, known)
        if not isinstance(lazy, str) or isinstance(obj, str):
            return False
        module, _, attr = lazy.partition(":")
        return getattr(obj, "__module__", None) == module and getattr(obj, "__qualname__", None) == attr


def load(path: str) -> object:
    """The object a lazy ``"module:attr"`` name names, its module imported now."""
    module, sep, attr = path.partition(":")
    if not sep:
        raise ValueError(f"lazy registry entry {path!r} is not 'module:attr'")
    return getattr(importlib.import_module(module), attr)
