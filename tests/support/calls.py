"""Counting the calls of one method of one object, to assert how often a test
made the code walk something (a tree, a queue) rather than how long it took."""

from __future__ import annotations

from typing import Any


class CallCounter:
    """Replaces ``obj.name`` by a wrapper that counts its calls in ``calls``."""

    def __init__(self, obj: Any, name: str) -> None:
        self.calls = 0
        inner = getattr(obj, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return inner(*args, **kwargs)

        setattr(obj, name, counted)
