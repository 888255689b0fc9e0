"""Per-agent room bookkeeping shared by the backends.

News about a room (a notice, a landed chunk) can reach an agent before the
engine created the room's sender/receiver, or after it finished or aborted it.
Early news is buffered until the room opens; late news for a closed room is
dropped. Both are forgotten after ``ttl_s``, so a peer that never follows up
cannot make an agent grow.
"""

from __future__ import annotations

import time
from typing import Any, Generic, TypeVar

H = TypeVar("H")


class RoomTable(Generic[H]):
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._active: dict[int, H] = {}
        self._buffered: dict[int, tuple[float, list[Any]]] = {}
        self._closed: dict[int, float] = {}

    def open(self, room: int, handler: H) -> list[Any]:
        """Register a room's handler; returns the news buffered for it."""
        if room in self._active:
            raise ValueError(f"room {room} is already open on this agent")
        self._closed.pop(room, None)
        self._active[room] = handler
        _, items = self._buffered.pop(room, (0.0, []))
        return items

    def get(self, room: int) -> H | None:
        return self._active.get(room)

    def close(self, room: int) -> None:
        if self._active.pop(room, None) is not None:
            self._closed.pop(room, None)  # re-insert: the dict stays ordered by time
            self._closed[room] = time.monotonic()

    def is_closed(self, room: int) -> bool:
        return room in self._closed

    def buffer(self, room: int, item: Any) -> None:
        """Keep news for a room that is not open (yet)."""
        entry = self._buffered.setdefault(room, (time.monotonic(), []))
        entry[1].append(item)

    def expire(self) -> list[Any]:
        """Forget old buffered news and tombstones; returns the dropped news.

        Both dicts are ordered by insertion time, so this only looks at the
        entries it drops (plus one): cheap enough to call on every poll."""
        cutoff = time.monotonic() - self.ttl_s
        dropped: list[Any] = []
        while self._buffered:
            room, (stamp, items) = next(iter(self._buffered.items()))
            if stamp >= cutoff:
                break
            del self._buffered[room]
            dropped.extend(items)
        while self._closed:
            room, stamp = next(iter(self._closed.items()))
            if stamp >= cutoff:
                break
            del self._closed[room]
        return dropped

    def handlers(self) -> list[H]:
        return list(self._active.values())

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_buffered(self) -> int:
        return len(self._buffered)


class ChunkTracker:
    """Which chunks of a room have landed; complete once 0..last all did."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._last: int | None = None

    def add(self, chunk_index: int, is_last: bool) -> None:
        self._seen.add(chunk_index)
        if is_last:
            self._last = chunk_index

    @property
    def started(self) -> bool:
        return bool(self._seen)

    @property
    def complete(self) -> bool:
        return self._last is not None and len(self._seen) == self._last + 1
