"""The default transfer backend: one NIXL agent per instance, over UCX.

1. At construction the whole KV buffer is registered once with the UCX backend
   (DRAM on CPU, VRAM on GPU); ``peer_info`` carries the NIXL agent metadata
   (UCX worker address and the buffer's remote key) next to base/size/layout.
2. ``add_peer`` checks the layouts pair and loads the peer's metadata.
3. Each chunk of a room becomes one NIXL WRITE request whose descriptor lists
   are the merged page runs of every region (local DRAM/VRAM -> remote). The
   request carries a notification; NIXL's UCX engine flushes the endpoint
   before sending it, so a notice means that chunk's bytes have landed.
4. The decode side pulls notices with ``get_new_notifs`` and counts chunks; a
   room is done when chunks 0..last have all been announced.
5. Aborts travel as standalone notifications (``send_notif``) both ways.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from pdserve.common.codec import CodecError, decode, encode
from pdserve.transfer.base import KVMemory, RoomState, TransferConfig, TransferError
from pdserve.transfer.messages import NOTICE_CHUNK, AgentInfo, RoomNews, RoomNotice
from pdserve.transfer.rooms import (
    ChunkTracker,
    QuiescenceClock,
    RoomAgent,
    RoomReceiver,
    RoomSender,
)

logger = logging.getLogger("pdserve.transfer.nixl")

_UCX = "UCX"


def _mem_type(memory: KVMemory) -> str:
    return "DRAM" if memory.device == "cpu" else "VRAM"


class NixlSender(RoomSender):
    """Quiescence: every WRITE reported DONE/ERR and released; a WRITE released
    while still in flight gets the grace of :class:`QuiescenceClock` (UCX cannot
    recall bytes already handed to the transport); a zombie (release refused)
    counts until the agent retires it, capped at the room's ``timeout_s``."""

    _agent: NixlAgent

    def __init__(self, agent: NixlAgent, room: int, peer: str, dst_pages: list[int], timeout_s: float):
        super().__init__(agent, room, peer, dst_pages, timeout_s)
        self._handles: list[tuple[Any, float]] = []  # (handle, monotonic time posted)
        self._error: str | None = None
        self._zombies: list = []
        self._clock = QuiescenceClock(cap_s=timeout_s)

    def _post(self, src: list[int], dst: list[int], chunk_index: int, is_last: bool) -> None:
        peer, descs = self._descriptors(src, dst)
        notice = RoomNotice(room=self.room, kind=NOTICE_CHUNK, sender=self._agent.name, chunk_index=chunk_index, is_last=is_last)
        if len(descs) == 0:
            # An empty last chunk: its notice needs no data ordering because
            # the receiver waits for every earlier chunk's own notice anyway.
            self._agent.notify(self.peer, notice)
            return
        handle = self._agent.write(descs, peer, encode(notice))
        self._handles.append((handle, time.monotonic()))
        self._count(descs)

    def collect(self) -> None:
        """Retire finished WRITEs; the agent's progress() calls this."""
        pending = []
        now = time.monotonic()
        for handle, posted_at in self._handles:
            state = self._agent.xfer_state(handle)
            if state == "PROC":
                pending.append((handle, posted_at))
                continue
            self._clock.observe(now - posted_at)
            if state == "ERR" and self._error is None:
                self._error = f"room {self.room}: NIXL transfer failed"
            self._agent.release(handle)
        self._handles = pending

    def _progress(self) -> bool:
        if self._error is not None:
            raise TransferError(self._error)
        return not self._handles

    def _release(self) -> None:
        now = time.monotonic()
        for handle, posted_at in self._handles:
            in_flight = self._agent.xfer_state(handle) == "PROC"
            released = self._agent.release(handle)
            if not released:
                self._zombies.append(handle)
                self._clock.released_reported()
            elif in_flight:
                self._clock.released_unreported(now - posted_at)
        self._handles = []

    def quiescent(self) -> bool:
        if self._handles or self._clock.in_grace():
            return False
        self._zombies = [h for h in self._zombies if self._agent.is_zombie(h)]
        return not self._zombies or self._clock.capped(self.room, f"{len(self._zombies)} NIXL zombie handle(s)")


class NixlReceiver(RoomReceiver):
    _agent: NixlAgent

    def __init__(self, agent: NixlAgent, room: int, peer: str, timeout_s: float):
        super().__init__(agent, room, peer, timeout_s)
        self._chunks = ChunkTracker()

    def _on_data(self, news: RoomNews) -> None:
        if isinstance(news, RoomNotice) and news.kind == NOTICE_CHUNK:
            self._chunks.add(news.chunk_index, news.is_last)
            self._state = RoomState.TRANSFERRING
            if self._chunks.complete:
                self._succeed()

    def _refresh(self) -> None:
        """Notices are routed by the agent's progress(); nothing to look at here."""

    def quiescent(self) -> bool:
        # P writes into our pages; the receiver posts nothing of its own. P's
        # sender.quiescent() is what tells that its WRITEs ended.
        return self._state.is_terminal


def _create_nixl_agent(name: str, progress_delay_us: int):
    """A nixl agent whose progress thread sleeps ``progress_delay_us`` between polls.

    nixl's Python wrapper hard-codes a delay of 0, which makes the progress
    thread spin a whole core per instance; on a shared host that starves the
    engines. The wrapper offers no knob, so the config it builds is adjusted on
    its way into the native agent.
    """
    import nixl._api as api

    native_agent = api.nixlBind.nixlAgent

    def with_delay(agent_name, agent_config):
        agent_config.pthrDelay = progress_delay_us
        return native_agent(agent_name, agent_config)

    api.nixlBind.nixlAgent = with_delay
    try:
        return api.nixl_agent(name, api.nixl_agent_config(backends=[]))
    finally:
        api.nixlBind.nixlAgent = native_agent


class NixlAgent(RoomAgent, backend="nixl", sender=NixlSender, receiver=NixlReceiver):
    native_package = "nixl"

    def __init__(self, config: TransferConfig, memory: KVMemory) -> None:
        super().__init__(config, memory)
        self.nixl = _create_nixl_agent(self._name, config.progress_delay_us)
        params = {"ucx_devices": config.ib_device} if config.ib_device else {}
        self.nixl.create_backend(_UCX, params)
        self._mem_type = _mem_type(memory)
        self._reg = self.nixl.register_memory(
            [(memory.base_ptr, memory.num_bytes, memory.device_id, "")], self._mem_type
        )
        self._zombies: list = []  # handles whose release failed while in flight
        self._num_handles = 0

    def _backend_metadata(self) -> bytes:
        return self.nixl.get_agent_metadata()

    def _connect(self, info: AgentInfo) -> None:
        loaded = self.nixl.add_remote_agent(info.backend_metadata)
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
        if loaded != info.name:
            raise ValueError(f"peer metadata names {loaded!r} but peer info names {info.name!r}")

    def _disconnect(self, name: str) -> None:
        try:
            self.nixl.remove_remote_agent(name)
        except Exception as exc:  # nixl raises its own binding error types
            logger.warning("removing NIXL peer %s: %s", name, exc)

    def write(self, descs, peer: AgentInfo, notif: bytes):
        dev = np.uint64(self.memory.device_id)
        local = np.stack([descs.src_offsets + np.uint64(self.memory.base_ptr), descs.lengths,
                          np.full(len(descs), dev)], axis=1)
        remote = np.stack([descs.dst_offsets + np.uint64(peer.base_ptr), descs.lengths,
                           np.full(len(descs), np.uint64(peer.device_id))], axis=1)
        try:
            handle = self.nixl.initialize_xfer(
                "WRITE",
                self.nixl.get_xfer_descs(local, self._mem_type),
                self.nixl.get_xfer_descs(remote, "DRAM" if peer.device == "cpu" else "VRAM"),
                peer.name,
                notif,
            )
        except Exception as exc:  # nixl raises its own binding error types
            raise TransferError(f"cannot create NIXL WRITE to {peer.name}: {exc}") from exc
        self._num_handles += 1
        try:
            posted = self.nixl.transfer(handle)
        except Exception as exc:  # e.g. the peer disconnected
            posted = f"ERR ({exc})"
        if posted.startswith("ERR"):
            self.release(handle)
            raise TransferError(f"NIXL WRITE to {peer.name} failed to post: {posted}")
        return handle

    def xfer_state(self, handle) -> str:
        """'DONE', 'PROC' or 'ERR'; a raising backend counts as 'ERR'."""
        try:
            return self.nixl.check_xfer_state(handle)
        except Exception as exc:  # nixl raises e.g. on a disconnected peer
            logger.warning("NIXL transfer state: %s", exc)
            return "ERR"

    def release(self, handle) -> bool:
        """Release a handle; False when it is kept as a zombie (still in flight)."""
        try:
            handle.release()
            self._num_handles -= 1
            return True
        except Exception:
            # Still in flight and not cancellable yet: retry on later progress() calls.
            self._zombies.append(handle)
            return False

    def is_zombie(self, handle) -> bool:
        return any(z is handle for z in self._zombies)

    def notify(self, peer: str, notice: RoomNotice) -> None:
        try:
            self.nixl.send_notif(peer, encode(notice))
        except Exception as exc:  # the peer may be gone; its side times out
            logger.warning("room %d: cannot notify %s: %s", notice.room, peer, exc)

    def progress(self) -> None:
        """Deliver new notifications to their rooms and retire old state."""
        for remote, messages in self.nixl.get_new_notifs().items():
            for raw in messages:
                self._deliver(remote, raw)
        for handler in self.rooms.handlers():
            if isinstance(handler, NixlSender):
                handler.collect()
        self.expire_rooms()
        zombies, self._zombies = self._zombies, []
        for handle in zombies:
            if self.xfer_state(handle) != "PROC":
                self.release(handle)
            else:
                self._zombies.append(handle)

    def _deliver(self, remote: str, raw: bytes) -> None:
        try:
            msg = decode(raw)
        except CodecError as exc:
            logger.warning("dropping malformed notification from %s: %s", remote, exc)
            return
        if isinstance(msg, RoomNotice):
            self.route(msg.room, msg)
        else:
            self._on_other(remote, msg)

    def _on_other(self, remote: str, msg: object) -> None:
        """A notification that is not a room notice; backends that extend NIXL take theirs."""
        logger.warning("dropping unexpected %s notification from %s", type(msg).__name__, remote)

    def _num_inflight(self) -> int:
        return self._num_handles

    def _shutdown(self) -> None:
        for name in list(self._peers):
            try:
                self.nixl.remove_remote_agent(name)
            except Exception as exc:  # best effort while shutting down
                logger.debug("remove_remote_agent(%s): %s", name, exc)
        self.nixl.deregister_memory(self._reg)
