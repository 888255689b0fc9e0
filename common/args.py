"""Build an argparse parser from a frozen config dataclass.

Flags are the field names with dashes; help, choices and types come from the
field metadata, defaults from the dataclass itself, so no default is written
twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

_C = TypeVar("_C")


def _scalar_type(hint: object) -> type:
    """int for ``int`` and ``int | None``; likewise float and str."""
    candidates = [hint, *typing.get_args(hint)]
    for typ in (int, float, str):
        if typ in candidates:
            return typ
    return str


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        default = f.default
        if hints[f.name] is bool:
            parser.add_argument(flag, action="store_true", default=default, help=help_text)
            continue
        kwargs: dict[str, Any] = {"default": default, "help": f"{help_text} (default: {default})"}
        kwargs["type"] = meta.pop("type", _scalar_type(hints[f.name]))
        kwargs.update(meta)
        parser.add_argument(flag, **kwargs)


def config_from_args(cls: type[_C], ns: argparse.Namespace) -> _C:
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(ns, f.name)
        if isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)
