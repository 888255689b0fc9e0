"""The one polling loop of the test suite."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float = 5.0,
    interval_s: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call ``predicate`` every ``interval_s`` until it returns something truthy,
    and return that.

    After ``timeout_s`` it raises :class:`AssertionError` with ``message``; a
    callable ``message`` is called only then, so it can describe the state at
    the deadline. The predicate is tried at least once, and may itself raise to
    give up early (a process that died, say).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (waited {timeout_s:g} s)")
        time.sleep(interval_s)
