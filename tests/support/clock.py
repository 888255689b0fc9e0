"""A clock that moves only when a test says so."""

from __future__ import annotations


class FakeClock:
    """Pass as ``clock=`` to a product class that reads time through it, then
    :meth:`advance` it instead of sleeping until something expires."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds
