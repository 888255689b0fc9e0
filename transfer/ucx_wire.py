"""UCX plumbing for the ucx transfer backend: wire header, buffers, requests,
and the inbound service thread."""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pdserve.common.codec import CodecError, decode, message
from pdserve.transfer.base import KVMemory
from pdserve.transfer.messages import RoomNews, RoomNotice

logger = logging.getLogger("pdserve.transfer.ucx")

AM_RECV_WINDOW = 16  # active-message receives kept posted per incoming endpoint
_IDLE_SLEEP_MIN_S = 100e-6
_IDLE_SLEEP_MAX_S = 2e-3


@message
@dataclass(frozen=True, kw_only=True)
class UcxAddress:
    """Where an agent's UCX listener takes connections (its backend metadata)."""

    host: str
    port: int


@message
@dataclass(frozen=True, kw_only=True)
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
class InboundChunk(RoomNews):
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


def check_header(header: UcxChunkHeader, buffer_bytes: int) -> str | None:
    """Why the header must not be written into our buffer, or None."""
    if not len(header.tags) == len(header.dst_offsets) == len(header.lengths):
        return "malformed chunk header"
    pairs = zip(header.dst_offsets, header.lengths, strict=True)
    if not all(o >= 0 and n >= 0 and o + n <= buffer_bytes for o, n in pairs):
        return f"destination outside this agent's {buffer_bytes}-byte buffer"
    return None


class InboundService:
    """A thread that turns arriving chunk headers into posted receives at once.

    A sender's large (rendezvous) messages only move once the matching receive
    is posted; doing that here rather than in the engine's next poll keeps the
    transfer independent of how long the decode step takes. Everything else
    (room state) stays on the engine thread, which collects ``take_news()``."""

    def __init__(self, worker, memory: KVMemory, is_closed: Callable[[int], bool]) -> None:
        import ucxx._lib.libucxx as ucx_api

        self._tag = ucx_api.UCXXTag
        self._worker = worker
        self._memory = memory
        self._is_closed = is_closed
        self._lock = threading.Lock()
        self._accepted: list = []
        self._inboxes: list[Inbox] = []
        self._news: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self.turns_done = 0  # only this service's thread writes it
        self._thread = threading.Thread(target=self._run, name="pdserve-ucx-inbound", daemon=True)
        self._thread.start()

    def adopt(self, endpoint) -> None:
        """A peer connected (called on the UCX progress thread)."""
        with self._lock:
            self._accepted.append(endpoint)

    def take_news(self) -> list:
        news = []
        while True:
            try:
                news.append(self._news.get_nowait())
            except queue.Empty:
                return news

    def endpoints(self) -> list:
        with self._lock:
            return [inbox.endpoint for inbox in self._inboxes] + list(self._accepted)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        sleep_s = _IDLE_SLEEP_MIN_S
        while not self._stop.is_set():
            try:
                busy = self._turn()
            except Exception:  # keep serving the other endpoints
                logger.exception("ucx inbound service turn failed")
                busy = False
            self.turns_done += 1
            # Back off while idle so an idle agent costs (almost) no CPU.
            sleep_s = _IDLE_SLEEP_MIN_S if busy else min(sleep_s * 2, _IDLE_SLEEP_MAX_S)
            self._stop.wait(sleep_s)

    def _turn(self) -> bool:
        with self._lock:
            self._inboxes += [Inbox(endpoint) for endpoint in self._accepted]
            self._accepted = []
            inboxes = list(self._inboxes)
        busy = False
        for inbox in inboxes:
            messages, alive = inbox.take()
            for raw in messages:
                self._handle(raw)
            busy = busy or bool(messages)
            if not alive:
                with self._lock:
                    self._inboxes.remove(inbox)
        return busy

    def _handle(self, raw: bytes) -> None:
        try:
            msg = decode(raw)
        except CodecError as exc:
            logger.warning("dropping malformed transfer message: %s", exc)
            return
        if isinstance(msg, UcxChunkHeader):
            self._news.put(self._receive(msg))
        elif isinstance(msg, RoomNotice):
            self._news.put(msg)
        else:
            logger.warning("dropping unexpected transfer message %s", type(msg).__name__)

    def _receive(self, header: UcxChunkHeader) -> InboundChunk:
        """Post the chunk's receives: into its pages, or scratch if unwanted."""
        chunk = InboundChunk(header.room, header.sender, header.chunk_index, header.is_last, Flight())
        chunk.error = check_header(header, self._memory.num_bytes)
        scratch = chunk.error is not None or self._is_closed(header.room)
        for tag, offset, length in zip(header.tags, header.dst_offsets, header.lengths, strict=False):
            buffer = scratch_view(length) if scratch else byte_view(self._memory, offset, length)
            chunk.flight.add(self._worker.tag_recv(buffer, self._tag(tag)), buffer)
        return chunk
