"""What an instance is: one enum for ``--disaggregation-mode`` and the registry's role field."""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    """An instance's role. ``null`` (colocated) is SGLang's name for "not disaggregated"."""

    COLOCATED = "null"
    PREFILL = "prefill"
    DECODE = "decode"

    def __str__(self) -> str:
        return self.value

    @property
    def is_pd(self) -> bool:
        return self is not Role.COLOCATED

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(role.value for role in cls)
