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

ALL: tuple[EnvVar, ...] = (MODEL_DIR, OPENAI_API_KEY)
