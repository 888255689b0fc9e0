"""Least-recently-used eviction candidates of a tree, kept across evictions.

A bounded cache that is full evicts a little at a time: a page for each
request that crosses a page border (the engine's prefix cache), a few
leaves for each routed request (the router's prefix tree). Building a heap
from a walk of the whole tree at every eviction makes each of those cost
the tree's size. This heap is kept instead. The tree pushes each leaf it
adds; an entry records the node's access time when pushed and is checked
when popped, since the tree changes in between (the node was evicted,
gained children, is in use, or was used since, which moves it to its new
place). The tree is walked again when the heap runs dry, and when stale
entries have made it more than twice as long as the last walk left it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

# Below this many entries a heap is never re-walked for length: walks of a
# small tree are cheap anyway, and a few stale entries cost nothing.
MIN_WALKED_LEN = 1024


class LruHeap(Generic[T]):
    def __init__(self, candidates: Callable[[], Iterable[tuple[int, T]]], access_of: Callable[[T], int | None]) -> None:
        """``candidates()`` walks the tree: every evictable node with its access
        time. ``access_of(node)``: its access time if it is evictable now, else None."""
        self._candidates = candidates
        self._access_of = access_of
        self._heap: list[tuple[int, int, T]] = []
        self._tiebreak = itertools.count()  # nodes need not compare
        self._walked_len = 0  # the heap's length right after the last walk

    def push(self, node: T, access: int) -> None:
        """A leaf the tree just added, or a node whose last child went."""
        heapq.heappush(self._heap, (access, next(self._tiebreak), node))
        if len(self._heap) > 2 * max(self._walked_len, MIN_WALKED_LEN):
            self._walk()  # mostly stale entries now: start again from the tree

    def _walk(self) -> None:
        self._heap = [(access, next(self._tiebreak), node) for access, node in self._candidates()]
        heapq.heapify(self._heap)
        self._walked_len = len(self._heap)

    def pop(self) -> T | None:
        """The least recently used evictable node, or None when there is none."""
        walked = False
        while True:
            if not self._heap:
                if walked:
                    return None
                self._walk()
                walked = True
                continue
            pushed, _, node = heapq.heappop(self._heap)
            access = self._access_of(node)
            if access is None:
                continue  # evicted, not a leaf, or in use: found again when it becomes one, or by a walk
            if access != pushed:
                self.push(node, access)  # used since: its place in the order moved
                continue
            return node

    def clear(self) -> None:
        self._heap, self._walked_len = [], 0
