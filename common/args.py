"""Build an argparse parser from a frozen config dataclass.

Flags are the field names with dashes; help, choices and types come from the
field metadata, defaults from the dataclass itself, so no default is written
twice. Every CLI of pdserve (serve, router, up, bootstrap, bench, model,
check-env and the benchmarks' scripts) is built this way; a CLI with
subcommands has a config dataclass per subcommand (``Subcommand``).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pdserve.common.env import EnvVar
from pdserve.common.registry import Registry

_C = TypeVar("_C")


def flag(help_text: str, **extra: object) -> dict[str, object]:
    """Field metadata of one flag: its help and any argparse keyword (choices, nargs, ...)."""
    return {"help": help_text, **extra}


def _enum_type(hint: object) -> type[enum.Enum] | None:
    """The enum of a field typed ``Role`` (or ``Role | None``), else None."""
    for typ in (hint, *typing.get_args(hint)):
        if isinstance(typ, type) and issubclass(typ, enum.Enum):
            return typ
    return None


def _scalar_type(hint: object) -> type:
    """int for ``int`` and ``int | None``; likewise float and str (an enum's values too)."""
    candidates = [hint, *typing.get_args(hint)]
    for typ in (int, float, str):
        if typ in candidates:
            return typ
    return str


def _shown(default: object) -> str:
    """A default as a user types it: ``off`` for a false switch, ``none`` for nothing."""
    if isinstance(default, enum.Enum):
        return str(default.value)
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

    Metadata may rename the flag (``flag="--worker"``), make the field a
    positional argument (``positional=True``; required when the field has no
    default) or mark a field whose type is itself a config dataclass
    (``nested=True``): its fields become flags. An enum field takes its
    members' values.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or f.metadata.get("skip"):
            continue
        if f.metadata.get("nested"):
            add_dataclass_args(parser, hints[f.name], choices, skip)
            continue
        field_choices = choices.get(f.name) if choices else None
        _add_field(parser, f, hints[f.name], field_choices)


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: object,
               choices: Sequence[str] | None) -> None:
    meta = dict(f.metadata)
    help_text = str(meta.pop("help", ""))
    default = f.default
    if meta.pop("positional", False):
        required = default is dataclasses.MISSING
        kwargs: dict[str, Any] = {"help": help_text} if required else {"help": _help(help_text, default),
                                                                       "default": default}
        parser.add_argument(f.name, type=meta.pop("type", _scalar_type(hint)), **kwargs, **meta)
        return
    names = (str(meta.pop("flag", "--" + f.name.replace("_", "-"))), *meta.pop("aliases", ()))
    if hint is bool:
        parser.add_argument(*names, dest=f.name, action="store_true", default=default, help=_help(help_text, default))
        return
    # "extend" would append to the default: it starts empty (None) and
    # config_from_args takes the dataclass default when nothing was given.
    parsed_default = None if meta.get("action") == "extend" else default
    kwargs = {"dest": f.name, "default": parsed_default, "help": _help(help_text, default)}
    kwargs["type"] = meta.pop("type", _scalar_type(hint))
    members = _enum_type(hint)
    if members is not None:  # the flag takes the values; config_from_args makes them members
        kwargs["choices"] = tuple(m.value for m in members)
    kwargs.update(meta)
    if choices is not None:
        kwargs["choices"] = tuple(choices)
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
        members = _enum_type(hints[f.name])
        if members is not None and value is not None:
            value = members(value)
        values[f.name] = value
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One subcommand of a CLI: its flags (the fields of ``config``), what runs it, its help."""

    config: type
    run: Callable[[Any], int]
    help: str


def subcommand_parser(prog: str, description: str, commands: Registry[Subcommand]) -> argparse.ArgumentParser:
    """A parser with one subparser per entry of ``commands``, its flags from the entry's
    config; the chosen name lands in ``command`` (``chosen_subcommand`` reads it back)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, help=" or ".join(commands.names()))
    for name in commands.names():
        command = commands.get(name)
        add_dataclass_args(sub.add_parser(name, help=command.help, description=command.help), command.config)
    return parser


def chosen_subcommand(commands: Registry[Subcommand], ns: argparse.Namespace) -> tuple[Subcommand, Any]:
    """The subcommand ``subcommand_parser``'s parser chose, and its config filled from the flags."""
    command = commands.get(ns.command)
    return command, config_from_args(command.config, ns)


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
