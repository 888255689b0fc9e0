"""One msgpack codec for every typed message that crosses a process boundary.

Messages are frozen dataclasses registered with :func:`message`. On the wire a
message is a map ``{"t": <type name>, "f": {field: value}}``: named fields, never
positional frames, so a reader can tell what it got and old readers ignore new
fields. Nested registered messages and lists of them round-trip too, and so do
fields declared as an ``Enum`` (their value on the wire).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from enum import Enum
from typing import Any, TypeVar

import msgpack

_T = TypeVar("_T")


class CodecError(ValueError):
    """Raised when bytes do not decode to a registered message."""


class MessageRegistry:
    """Maps type names to message classes; one instance per codec."""

    def __init__(self) -> None:
        self._by_name: dict[str, type] = {}

    def register(self, cls: type[_T]) -> type[_T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if not all(f.kw_only for f in dataclasses.fields(cls)):
            raise TypeError(f"{cls.__name__} must be a kw_only dataclass: messages are built by field name")
        name = cls.__name__
        if name in self._by_name and self._by_name[name] is not cls:
            raise TypeError(f"message type {name} registered twice")
        self._by_name[name] = cls
        return cls

    def lookup(self, name: str) -> type:
        try:
            return self._by_name[name]
        except KeyError:
            raise CodecError(f"unknown message type {name!r}") from None


REGISTRY = MessageRegistry()


def message(cls: type[_T]) -> type[_T]:
    """Class decorator: register a dataclass as a wire message."""
    return REGISTRY.register(cls)


_PLAIN_NAMES = frozenset({"list", "tuple", "int", "str", "float", "bool", "bytes", "None"})


@dataclasses.dataclass(frozen=True)
class _Shape:
    order: tuple[str, ...]  # field names as declared
    names: frozenset[str]
    tuples: frozenset[str]  # declared as tuples: restored from msgpack arrays
    plain: frozenset[str]  # scalars and lists of them: msgpack packs these as they are
    enums: dict[str, type[Enum]]  # declared as an Enum: restored from its value


@functools.cache
def _shape(cls: type) -> _Shape:
    """The wire shape of a message class, computed once.

    Resolving string annotations costs ~100 us a class, and every token the
    engine streams crosses this codec; fields of plain types (``list[int]``,
    ``list[list[int]]``, ``str | None``) skip the per-element walk, so columns
    of token ids are packed and unpacked at C speed.
    """
    hints = typing.get_type_hints(cls)
    order = tuple(f.name for f in dataclasses.fields(cls))
    names = frozenset(order)
    kinds = {n: str(hints.get(n, "")) for n in names}
    return _Shape(
        order=order,
        names=names,
        tuples=frozenset(n for n, k in kinds.items() if "tuple" in k),
        plain=frozenset(n for n, k in kinds.items() if set(re.findall(r"[A-Za-z_]\w*", k)) <= _PLAIN_NAMES),
        enums={n: hints[n] for n in names if isinstance(hints.get(n), type) and issubclass(hints[n], Enum)},
    )


def _to_wire(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        shape = _shape(type(obj))
        fields = {name: _field_to_wire(obj, name, shape.plain) for name in shape.order}
        return {"t": type(obj).__name__, "f": fields}
    if isinstance(obj, (list, tuple)):
        return [_to_wire(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_wire(v) for k, v in obj.items()}
    if isinstance(obj, Enum):
        return obj.value
    return obj


def _field_to_wire(obj: Any, name: str, plain: frozenset[str]) -> Any:
    value = getattr(obj, name)
    return value if name in plain else _to_wire(value)


def _from_wire(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"t", "f"} and isinstance(obj["t"], str):
            return _build(REGISTRY.lookup(obj["t"]), obj["f"])
        return {k: _from_wire(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_wire(x) for x in obj]
    return obj


def _build(cls: type, fields: dict[str, Any]) -> Any:
    shape = _shape(cls)
    kwargs = {k: v if k in shape.plain else _from_wire(v) for k, v in fields.items() if k in shape.names}
    for name in shape.tuples.intersection(kwargs):
        if isinstance(kwargs[name], list):
            kwargs[name] = tuple(kwargs[name])
    if shape.enums:  # most messages have none: no set built per message
        for name in shape.enums.keys() & kwargs.keys():
            kwargs[name] = _enum_member(cls, shape.enums[name], kwargs[name])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise CodecError(f"cannot build {cls.__name__}: {exc}") from exc


def _enum_member(cls: type, enum: type[Enum], value: Any) -> Enum:
    try:
        return enum(value)
    except ValueError as exc:
        raise CodecError(f"cannot build {cls.__name__}: {exc}") from exc


def encode(msg: Any) -> bytes:
    """Encode a registered message (or plain msgpack data) to bytes."""
    return msgpack.packb(_to_wire(msg), use_bin_type=True)


def decode(data: bytes) -> Any:
    """Decode bytes produced by :func:`encode`."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"not msgpack: {exc}") from exc
    return _from_wire(raw)
