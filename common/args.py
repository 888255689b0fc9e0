"""Build an argparse parser from a frozen config dataclass.

Flags are the field names with dashes; help, choices and types come from the
field metadata, defaults from the dataclass itself, so no default is written
twice. Every CLI of pdserve (serve, router, up, bootstrap, bench) is built
this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pdserve.common.env import EnvVar

_C = TypeVar("_C")


def flag(help_text: str, **extra: object) -> dict[str, object]:
    """Field metadata of one flag: its help and any argparse keyword (choices, nargs, ...)."""
    return {"help": help_text, **extra}


def _scalar_type(hint: object) -> type:
    """int for ``int`` and ``int | None``; likewise float and str."""
    candidates = [hint, *typing.get_args(hint)]
    for typ in (int, float, str):
        if typ in candidates:
            return typ
    return str


def _shown(default: object) -> str:
    """A default as a user types it: ``off`` for a false switch, ``none`` for nothing."""
    if default is False:
        return "off"
    if default is None or default == ():
        return "none"
    if isinstance(default, tuple):
        return " ".join("none" if v is None else str(v) for v in default)
    return str(default)


def _help(text: str, default: object) -> str:
    """The help with its default, said once (a help that names its default keeps it)."""
    if "default" in text:
        return text
    return f"{text} (default: {_shown(default)})"


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    choices: Mapping[str, Sequence[str]] | None = None,
    skip: Sequence[str] = (),
) -> None:
    """One flag per field of ``cls``; ``choices`` overrides a field's (registry names).

    Metadata may rename the flag (``flag="--worker"``) or mark a field whose
    type is itself a config dataclass (``nested=True``): its fields become flags.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        meta = dict(f.metadata)
        if meta.pop("skip", False):
            continue
        if meta.pop("nested", False):
            add_dataclass_args(parser, hints[f.name], choices, skip)
            continue
        flag_name = str(meta.pop("flag", "--" + f.name.replace("_", "-")))
        names = (flag_name, *meta.pop("aliases", ()))
        help_text = str(meta.pop("help", ""))
        default = f.default
        if hints[f.name] is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", default=default,
                                help=_help(help_text, default))
            continue
        # "extend" would append to the default: it starts empty (None) and
        # config_from_args takes the dataclass default when nothing was given.
        parsed_default = None if meta.get("action") == "extend" else default
        kwargs: dict[str, Any] = {"dest": f.name, "default": parsed_default, "help": _help(help_text, default)}
        kwargs["type"] = meta.pop("type", _scalar_type(hints[f.name]))
        kwargs.update(meta)
        if choices and f.name in choices:
            kwargs["choices"] = tuple(choices[f.name])
        parser.add_argument(*names, **kwargs)


def config_from_args(cls: type[_C], ns: argparse.Namespace) -> _C:
    """The config ``add_dataclass_args`` described, filled from parsed flags."""
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.metadata.get("nested"):
            values[f.name] = config_from_args(hints[f.name], ns)
            continue
        if not f.init or not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        if value is None and f.metadata.get("action") == "extend":
            continue
        if isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def read_secret(value: str | None, path: str | None, env_var: EnvVar[str | None], flag_name: str) -> str | None:
    """A secret from its flag, else the file its ``-file`` flag names, else ``env_var``.

    A file keeps the secret off command lines (``ps`` shows those to every
    user); its surrounding whitespace (a trailing newline) is not part of it.
    Raises ValueError for a file that cannot be read or is empty.
    """
    if value and path:
        raise ValueError(f"give {flag_name} or {flag_name}-file, not both")
    if path:
        try:
            text = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {flag_name}-file {path}: {exc}") from None
        if not text:
            raise ValueError(f"{flag_name}-file {path} is empty")
        return text
    return value or env_var.get()
