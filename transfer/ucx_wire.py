"""UCX plumbing for the ucx transfer backend: wire header, buffers, requests."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
from pdserve.common.codec import message
from pdserve.transfer.base import KVMemory

AM_RECV_WINDOW = 16  # active-message receives kept posted per incoming endpoint


@message
@dataclass(frozen=True)
class UcxChunkHeader:
    room: int
    sender: str
    chunk_index: int
    is_last: bool
    tags: list[int]
    dst_offsets: list[int]
    lengths: list[int]


class _CudaView:
    """A raw device byte range that ucxx's Array accepts."""

    def __init__(self, ptr: int, num_bytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None,
        }


def byte_view(memory: KVMemory, offset: int, num_bytes: int):
    from ucxx._lib.arr import Array

    ptr = memory.base_ptr + offset
    if memory.device == "cuda":
        return Array(_CudaView(ptr, num_bytes))
    return Array(np.ctypeslib.as_array((ctypes.c_uint8 * num_bytes).from_address(ptr)))


def scratch_view(num_bytes: int):
    """Host memory to swallow bytes nobody wants (closed rooms, bad offsets)."""
    from ucxx._lib.arr import Array

    return Array(np.empty(num_bytes, dtype=np.uint8))


class Flight:
    """UCX requests plus the buffers they use, kept alive until completion."""

    def __init__(self) -> None:
        self.items: list[tuple[object, object]] = []

    def add(self, request, buffer) -> None:
        self.items.append((request, buffer))

    def collect(self) -> str | None:
        """Drop completed requests; returns the first error seen, if any."""
        pending, error = [], None
        for request, buffer in self.items:
            if not request.completed:
                pending.append((request, buffer))
                continue
            try:
                request.check_error()
            except Exception as exc:  # ucxx raises one class per UCS status
                error = error or f"{type(exc).__name__}: {exc}"
        self.items = pending
        return error

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class InboundChunk:
    """A chunk whose receives are posted; landed once its flight is empty."""

    room: int
    sender: str
    chunk_index: int
    is_last: bool
    flight: Flight
    error: str | None = None


class Inbox:
    """An accepted endpoint with a window of posted active-message receives."""

    def __init__(self, endpoint) -> None:
        self.endpoint = endpoint
        self.pending = [endpoint.am_recv() for _ in range(AM_RECV_WINDOW)]

    def take(self) -> tuple[list[bytes], bool]:
        """Completed messages, in order, and whether the endpoint still works."""
        messages: list[bytes] = []
        alive = True
        while self.pending and self.pending[0].completed:
            request = self.pending.pop(0)
            try:
                request.check_error()
            except Exception:  # closed or failed endpoint: stop listening on it
                alive = False
                break
            messages.append(bytes(request.recv_buffer))
            self.pending.append(self.endpoint.am_recv())
        return messages, alive
