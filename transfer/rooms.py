"""Per-agent room bookkeeping shared by the backends.

News about a room (a notice, a landed chunk) can reach an agent before the
engine created the room's sender/receiver, or after it finished or aborted it.
Early news is buffered until the room opens; late news for a closed room is
dropped. Both are forgotten after ``ttl_s``, so a peer that never follows up
cannot make an agent grow.

:class:`RoomAgent`, :class:`RoomSender` and :class:`RoomReceiver` hold what
every backend does the same way (peers, opening a room and replaying its early
news, aborts, shutdown order); a backend adds only its data path.
"""

from __future__ import annotations

import logging
import secrets
import time
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pdserve.common.codec import encode
from pdserve.transfer.base import (
    AgentStats,
    KVMemory,
    KVReceiver,
    KVSender,
    TransferAgent,
    TransferConfig,
    check_layouts,
)
from pdserve.transfer.descriptors import DescriptorList, build_descriptors
from pdserve.transfer.messages import NOTICE_ABORT, AgentInfo, RoomNews, RoomNotice, decode_as

logger = logging.getLogger("pdserve.transfer")

H = TypeVar("H")


class RoomTable(Generic[H]):
    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
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
            self._closed[room] = self._clock()

    def is_closed(self, room: int) -> bool:
        return room in self._closed

    def buffer(self, room: int, item: Any) -> None:
        """Keep news for a room that is not open (yet)."""
        entry = self._buffered.setdefault(room, (self._clock(), []))
        entry[1].append(item)

    def expire(self) -> list[Any]:
        """Forget old buffered news and tombstones; returns the dropped news.

        Both dicts are ordered by insertion time, so this only looks at the
        entries it drops (plus one): cheap enough to call on every poll."""
        cutoff = self._clock() - self.ttl_s
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


class QuiescenceClock:
    """Bounds how long a room waits for work it let go of.

    Work released while in flight whose end the backend cannot report gets a
    grace of twice the longest in-flight time the room observed, within
    [``GRACE_MIN_S``, ``GRACE_MAX_S``]. Work the backend does report (zombie
    handles, drained requests) is waited for, but at most ``cap_s`` after the
    room let it go, so that quiescence comes on every path even if a dead peer
    leaves a request pending forever.
    """

    GRACE_MIN_S = 0.05
    GRACE_MAX_S = 3.0

    def __init__(self, cap_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cap_s = cap_s
        self._clock = clock
        self.longest_inflight_s = 0.0
        self._grace_end: float | None = None
        self._cap_end: float | None = None
        self._cap_logged = False

    def observe(self, inflight_s: float) -> None:
        self.longest_inflight_s = max(self.longest_inflight_s, inflight_s)

    def released_unreported(self, inflight_s: float) -> None:
        """Work was let go of in flight and nobody will say when it ends."""
        self.observe(inflight_s)
        grace_s = min(self.GRACE_MAX_S, max(self.GRACE_MIN_S, 2 * self.longest_inflight_s))
        end = self._clock() + grace_s
        self._grace_end = end if self._grace_end is None else max(self._grace_end, end)

    def released_reported(self) -> None:
        """Work was let go of and its completion is tracked elsewhere."""
        if self._cap_end is None:
            self._cap_end = self._clock() + self.cap_s

    def in_grace(self) -> bool:
        return self._grace_end is not None and self._clock() < self._grace_end

    def capped(self, room: int, what: str) -> bool:
        """True when the cap for reported work has passed (logged once)."""
        if self._cap_end is None or self._clock() < self._cap_end:
            return False
        if not self._cap_logged:
            self._cap_logged = True
            logger.warning("room %d: %s still pending after %.1fs; taken as quiescent", room, what, self.cap_s)
        return True


class RoomSender(KVSender):
    """A sender that lives in its agent's room table until it is finished."""

    def __init__(self, agent: RoomAgent, room: int, peer: str, dst_pages: list[int], timeout_s: float) -> None:
        super().__init__(room, peer, dst_pages, timeout_s)
        self._agent = agent

    def _pump(self) -> None:
        self._agent.progress()

    def _wait_for_pages(self) -> None:
        """The engine posts a chunk right after launching the forward that writes
        its pages. A data path outside CUDA's stream order (NIXL, UCX) must let
        that forward finish first; a stream-ordered copy does not wait."""
        memory = self._agent.memory
        if memory.device == "cuda" and memory.tensor is not None:
            torch.cuda.current_stream(memory.tensor.device).synchronize()

    def _descriptors(self, src: list[int], dst: list[int]) -> tuple[AgentInfo, DescriptorList]:
        """The peer, and one chunk's merged runs from ``src`` pages here to
        ``dst`` pages there, once the pages are written (``_wait_for_pages``)."""
        self._wait_for_pages()
        peer = self._agent.peer(self.peer)
        return peer, build_descriptors(src, dst, self._agent.memory.layout, peer.kv_layout)

    def _count(self, descs: DescriptorList) -> None:
        """Count a posted chunk's descriptors and bytes."""
        self.num_descriptors += len(descs)
        self.num_bytes += descs.num_bytes

    def on_news(self, news: RoomNews) -> None:
        if isinstance(news, RoomNotice) and news.kind == NOTICE_ABORT:
            self.on_peer_abort(news.reason)
        else:  # data addressed to a sending room is nonsense
            self._agent.discard(news)

    def _cancel(self, reason: str | None) -> None:
        self._release()
        if reason is not None:
            self._agent.notify_abort(self.peer, self.room, reason)

    @abstractmethod
    def _release(self) -> None:
        """Let go of the WRITEs still in flight."""

    def _finish(self) -> None:
        self._agent.rooms.close(self.room)


class RoomReceiver(KVReceiver):
    """A receiver that takes its peer's news; subclasses handle the data."""

    def __init__(self, agent: RoomAgent, room: int, peer: str, timeout_s: float) -> None:
        super().__init__(room, peer, timeout_s)
        self._agent = agent

    def _pump(self) -> None:
        self._agent.progress()

    def on_news(self, news: RoomNews) -> None:
        if self._state.is_terminal:
            # Only news replayed from the buffer can follow a terminal state:
            # a finished room is closed, so the agent drops its live news.
            self._agent.discard(news)
        elif news.sender != self.peer:
            logger.warning("room %d: news from %s, expected %s; ignored", self.room, news.sender, self.peer)
            self._agent.discard(news)
        elif isinstance(news, RoomNotice) and news.kind == NOTICE_ABORT:
            self._fail(f"peer aborted: {news.reason}", notify=False)
        else:
            self._on_data(news)

    @abstractmethod
    def _on_data(self, news: RoomNews) -> None:
        """News that some of the room's data has landed (or is landing)."""

    def _close(self, abort_reason: str | None) -> None:
        self._agent.rooms.close(self.room)
        self._release()
        if abort_reason is not None:
            self._agent.notify_abort(self.peer, self.room, abort_reason)

    def _release(self) -> None:
        """Let go of in-flight work when the room closes."""


_Handler = TypeVar("_Handler", bound="RoomSender | RoomReceiver")


class RoomAgent(TransferAgent):
    """What every backend's agent shares: its name, the peers it loaded, the
    room table that pairs news with senders/receivers, and shutdown order.

    A backend names itself and its room classes in its class line
    (``class NixlAgent(RoomAgent, backend="nixl", sender=NixlSender,
    receiver=NixlReceiver)``; a subclass inherits what it does not name) and
    implements connecting a peer, sending a notice and the data path.
    """

    backend: ClassVar[str]
    sender_class: ClassVar[type[RoomSender]]
    receiver_class: ClassVar[type[RoomReceiver]]

    def __init_subclass__(cls, *, backend: str | None = None, sender: type[RoomSender] | None = None,
                          receiver: type[RoomReceiver] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if backend is not None:
            cls.backend = backend
        if sender is not None:
            cls.sender_class = sender
        if receiver is not None:
            cls.receiver_class = receiver

    def __init__(self, config: TransferConfig, memory: KVMemory) -> None:
        super().__init__(config, memory)
        # A random suffix keeps a restarted instance distinct from its old self
        # in peers that still hold the previous metadata.
        self._name = f"{config.instance_name}-{secrets.token_hex(4)}"
        self._peers: dict[str, AgentInfo] = {}
        self.rooms: RoomTable[RoomSender | RoomReceiver] = RoomTable(config.notice_ttl_s)
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    def peer_info(self) -> bytes:
        m = self.memory
        return encode(AgentInfo(name=self._name, backend=self.backend, backend_metadata=self._backend_metadata(), base_ptr=m.base_ptr,
                                num_bytes=m.num_bytes, device=m.device, device_id=m.device_id, kv_layout=m.layout))

    def add_peer(self, peer_info: bytes) -> str:
        info = decode_as(peer_info, AgentInfo)
        assert isinstance(info, AgentInfo)
        if info.name in self._peers:
            return info.name
        if info.backend != self.backend:
            raise ValueError(
                f"peer {info.name} uses transfer backend {info.backend!r}, this agent {self.backend!r}"
            )
        check_layouts(self.memory.layout, info.kv_layout, self._name, info.name)
        self._connect(info)
        self._peers[info.name] = info
        return info.name

    def remove_peer(self, name: str) -> None:
        if self._peers.pop(name, None) is None:
            return
        for handler in self.rooms.handlers():
            if handler.peer == name:  # the caller should have ended these; never leave one dangling
                handler.abort()
        self._disconnect(name)

    def peer(self, name: str) -> AgentInfo:
        try:
            return self._peers[name]
        except KeyError:
            raise KeyError(f"unknown transfer peer {name!r}; call add_peer first") from None

    def create_sender(self, room: int, peer: str, dst_pages: list[int], timeout_s: float | None = None) -> KVSender:
        self.peer(peer)
        return self._open(room, self.sender_class(self, room, peer, dst_pages, self._timeout_s(timeout_s)))

    def create_receiver(self, room: int, peer: str, timeout_s: float | None = None) -> KVReceiver:
        self.peer(peer)
        return self._open(room, self.receiver_class(self, room, peer, self._timeout_s(timeout_s)))

    def _open(self, room: int, handler: _Handler) -> _Handler:
        for news in self.rooms.open(room, handler):
            handler.on_news(news)
        return handler

    def route(self, room: int, news: RoomNews) -> None:
        """Hand news to its room, keep it for a room not open yet, or drop it."""
        handler = self.rooms.get(room)
        if handler is not None:
            handler.on_news(news)
        elif self.rooms.is_closed(room):
            self.discard(news)
        else:
            self.rooms.buffer(room, news)

    def expire_rooms(self) -> None:
        for news in self.rooms.expire():
            self.discard(news)

    def discard(self, news: RoomNews) -> None:
        """News nobody will take; release whatever it holds."""

    def notify_abort(self, peer: str, room: int, reason: str) -> None:
        self.notify(peer, RoomNotice(room=room, kind=NOTICE_ABORT, sender=self._name, reason=reason))

    @abstractmethod
    def notify(self, peer: str, notice: RoomNotice) -> None:
        """Send a notice, best effort: a dead peer times the room out on its own."""

    @abstractmethod
    def _backend_metadata(self) -> bytes:
        """What a peer's backend needs to reach this agent."""

    @abstractmethod
    def _connect(self, info: AgentInfo) -> None:
        """Make a peer whose layout pairs with ours reachable."""

    @abstractmethod
    def _disconnect(self, name: str) -> None:
        """Let go of what the backend holds for a removed peer."""

    @abstractmethod
    def _num_inflight(self) -> int: ...

    @abstractmethod
    def _shutdown(self) -> None:
        """Release the backend once every open room is aborted."""

    def stats(self) -> AgentStats:
        return AgentStats(self.rooms.num_active, self.rooms.num_buffered, self._num_inflight(), len(self._peers))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handler in self.rooms.handlers():
            handler.abort()
        self._shutdown()
