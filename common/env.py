"""Every environment variable pdserve reads, declared once.

Behaviour is configured by flags; the environment only says where things are
on this machine. A new switch is added here, with its help, and read through
``.get()``; nothing else in the code reads ``os.environ`` for pdserve.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    name: str
    default: T
    parse: Callable[[str], T]
    help: str

    def get(self, environ: Mapping[str, str] | None = None) -> T:
        raw = (os.environ if environ is None else environ).get(self.name)
        return self.default if raw is None or raw == "" else self.parse(raw)


MODEL_DIR: EnvVar[str | None] = EnvVar(
    "PDSERVE_MODEL_DIR", None, str, "where the built-in models are written (default: ~/.cache/pdserve/models)")

OPENAI_API_KEY: EnvVar[str | None] = EnvVar(
    "OPENAI_API_KEY", None, str, "pdserve bench's bearer token when --api-key is not given (the OpenAI clients' name)")

API_KEY: EnvVar[str | None] = EnvVar(
    "PDSERVE_API_KEY", None, str,
    "the API key of `pdserve serve` and `pdserve router` when --api-key is not given "
    "(how `pdserve up` hands it to its children: never on a command line that `ps` shows)")

CLUSTER_SECRET: EnvVar[str | None] = EnvVar(
    "PDSERVE_CLUSTER_SECRET", None, str,
    "the cluster secret when neither --cluster-secret nor --cluster-secret-file is given")

LIFELINE_FD: EnvVar[int | None] = EnvVar(
    "PDSERVE_LIFELINE_FD", None, int,
    "set by `pdserve up` for its children: a pipe whose end of file means the launcher is gone")

PROMETHEUS_MULTIPROC_DIR: EnvVar[str | None] = EnvVar(
    "PROMETHEUS_MULTIPROC_DIR", None, str,
    "set by `pdserve router --processes N` for its children (prometheus_client reads it): the directory "
    "where they keep the metrics one scrape sums")

ALL: tuple[EnvVar, ...] = (MODEL_DIR, OPENAI_API_KEY, API_KEY, CLUSTER_SECRET, LIFELINE_FD, PROMETHEUS_MULTIPROC_DIR)


def export(var: EnvVar, value: str) -> None:
    """Set ``var`` in this process's environment, for the children it starts
    from now on (a spawned child takes the environment as it is then)."""
    os.environ[var.name] = value


def child_environ(updates: Mapping[str, str], remove: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment with ``updates`` set and ``remove`` unset: a child's."""
    environ = {k: v for k, v in os.environ.items() if k not in remove}
    environ.update(updates)
    return environ
