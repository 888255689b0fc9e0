"""The paged KV pool: one buffer for all layers, pages with reference counts.

A page is referenced by every live request that uses it and by the prefix
cache while it is cached. A page returns to the free list when its count drops
to zero, exactly once; freeing a free page is a bug and raises.

A page can be fenced behind a GPU step still in flight (the overlap schedule
launches decode step N+1 before the host knows who finished at step N): if
it is released meanwhile, it waits outside the free list until the step is
done, so no new owner (or a peer's RDMA write) can touch it under that step.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import torch
from pdserve.common.kv_layout import KVLayout


class OutOfPages(RuntimeError):
    pass


class Guard(Protocol):
    """The in-flight work a fence waits for (``torch.cuda.Event`` is one)."""

    def query(self) -> bool:
        """True once the work has finished."""
        ...

    def synchronize(self) -> None:
        """Block until the work has finished."""
        ...


class KVPool:
    def __init__(self, layout: KVLayout, dtype: torch.dtype, device: torch.device):
        self.layout = layout
        self.page_size = layout.page_size
        self.buffer = torch.zeros(
            (layout.num_layers, 2, layout.num_pages, layout.page_size, layout.num_kv_heads, layout.head_dim),
            dtype=dtype,
            device=device,
        )
        self._refs = [0] * layout.num_pages
        self._free: deque[int] = deque(range(layout.num_pages))
        # Fences by number, oldest first, and the newest fence on each page
        # (0: none). A decode step fences a page per request: lifting a fence
        # walks its own pages, not every fenced page of the pool.
        self._fences: list[tuple[int, Guard, list[int]]] = []
        self._fence_of = [0] * layout.num_pages
        self._num_fences = 0
        self._parked: set[int] = set()  # released while fenced

    @property
    def num_pages(self) -> int:
        return self.layout.num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def alloc(self, num_pages: int) -> list[int]:
        if num_pages > len(self._free):
            raise OutOfPages(f"need {num_pages} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(num_pages)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def ref(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} is free and cannot gain a reference")
            self._refs[p] += 1

    def release(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} released more often than referenced")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if self._fence_of[p]:
                    self._parked.add(p)
                else:
                    self._free.append(p)

    def fence(self, pages: list[int], guard: Guard) -> None:
        """Keep ``pages`` from being reused until ``guard`` completes (a page
        fenced again waits for the newer guard)."""
        self._num_fences += 1
        number, fence_of = self._num_fences, self._fence_of
        for p in pages:
            fence_of[p] = number
        self._fences.append((number, guard, pages))

    def reclaim(self, wait: bool = False) -> None:
        """Lift the fences whose step has finished (``wait``: all of them, once
        their steps finish); free what was released under them."""
        if not self._fences:
            return
        if wait:
            for _, guard, _ in self._fences:
                guard.synchronize()
        pending = []
        for fence in self._fences:
            if wait or fence[1].query():
                self._lift(fence[0], fence[2])
            else:
                pending.append(fence)
        self._fences = pending

    def _lift(self, number: int, pages: list[int]) -> None:
        """Fence ``number`` is over: its pages that no newer fence holds are
        free to reuse, and those released meanwhile go back to the free list."""
        fence_of, parked = self._fence_of, self._parked
        for p in pages:
            if fence_of[p] == number:
                fence_of[p] = 0
                if parked and p in parked:
                    parked.discard(p)
                    self._free.append(p)

    @property
    def num_parked_pages(self) -> int:
        return len(self._parked)

    def ref_count(self, page: int) -> int:
        return self._refs[page]
