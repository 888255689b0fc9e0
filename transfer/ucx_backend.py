"""Transfer backend over ucxx (UCX without NIXL).

ucxx 0.52's Python API has no one-sided RMA (no ``mem_map``/``rkey``/``put``),
so WRITE semantics are built from two-sided messages, still zero-copy on both
ends:

1. Each agent runs a UCX listener (``config.host``/``config.port``, port 0 =
   ephemeral, published in ``peer_info``) and a ucxx progress thread; calls
   from the engine thread are handed to it (delayed submission).
2. For a chunk, the sender posts an active message with the header
   (room, chunk index, and per descriptor: a unique 64-bit tag, destination
   offset, length), then one tagged send per merged descriptor straight from
   the source pages.
3. The receiving agent, on each poll, turns every header into tagged receives
   whose buffers ARE the destination pages, so the bytes land in place. Large
   messages use UCX's rendezvous protocol, which moves them with the
   transport's zero-copy path (cma/knem on one host, RDMA reads on IB,
   cuda_ipc/cuda_copy for VRAM). A chunk has landed when all its receives
   completed; the room is done when chunks 0..last have.
4. Headers of a closed (finished or aborted) room are received into scratch
   buffers, so a late chunk never writes pages the decode side freed.
   Receives posted before an abort still complete into their pages.
5. Aborts are active messages carrying a ``RoomNotice``.
6. Quiescence. A sender is quiescent once its tagged sends (its own and those
   drained at an abort) completed: the source pages are no longer read, and
   any bytes still travelling land through the decode side's receives. A
   receiver is quiescent once the receives it posted (its own and those of late
   chunks for its closed room) completed, and the inbound service has finished
   two turns since the room closed (a turn that began before the close may have
   posted receives into the pages) whose news the agent has taken in. ucxx
   cannot cancel single requests, so requests a dead peer leaves pending count
   at most the room's ``timeout_s`` after the room let them go.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np
from pdserve.common.codec import encode
from pdserve.transfer.base import KVMemory, RoomState, TransferConfig, TransferError
from pdserve.transfer.messages import AgentInfo, RoomNews, RoomNotice, decode_as
from pdserve.transfer.rooms import (
    ChunkTracker,
    QuiescenceClock,
    RoomAgent,
    RoomReceiver,
    RoomSender,
)
from pdserve.transfer.ucx_wire import (
    Flight,
    InboundChunk,
    InboundService,
    UcxAddress,
    UcxChunkHeader,
    byte_view,
)

logger = logging.getLogger("pdserve.transfer.ucx")


class UcxSender(RoomSender):
    _agent: UcxAgent

    def __init__(self, agent: UcxAgent, room: int, peer: str, dst_pages: list[int], timeout_s: float):
        super().__init__(agent, room, peer, dst_pages, timeout_s)
        self._flight = Flight()
        self._drained: list[Flight] = []
        self._clock = QuiescenceClock(cap_s=timeout_s)

    def _post(self, src: list[int], dst: list[int], chunk_index: int, is_last: bool) -> None:
        _, descs = self._descriptors(src, dst)
        tags = [self._agent.next_tag() for _ in range(len(descs))]
        header = UcxChunkHeader(room=self.room, sender=self._agent.name, chunk_index=chunk_index, is_last=is_last, tags=tags,
                                dst_offsets=descs.dst_offsets.tolist(), lengths=descs.lengths.tolist())
        self._agent.send_message(self.peer, header, self._flight)
        self._agent.send_tagged(self.peer, descs.src_offsets.tolist(), descs.lengths.tolist(), tags, self._flight)
        self._count(descs)

    @property
    def num_inflight(self) -> int:
        return len(self._flight)

    def _progress(self) -> bool:
        # ``completed`` is kept current by the ucxx progress thread.
        error = self._flight.collect()
        if error is not None:
            raise TransferError(f"room {self.room}: {error}")
        return len(self._flight) == 0

    def _release(self) -> None:
        if len(self._flight):
            self._agent.drain(self._flight)
            self._drained.append(self._flight)
            self._clock.released_reported()
        self._flight = Flight()

    def quiescent(self) -> bool:
        # Read the requests without collecting them: _progress() reports their errors.
        if any(not request.completed for request, _ in self._flight.items):
            return False
        self._drained = [f for f in self._drained if len(f)]
        return not self._drained or self._clock.capped(self.room, "drained sends")


class UcxReceiver(RoomReceiver):
    _agent: UcxAgent

    def __init__(self, agent: UcxAgent, room: int, peer: str, timeout_s: float):
        super().__init__(agent, room, peer, timeout_s)
        self._chunks: list[InboundChunk] = []
        self._landed = ChunkTracker()
        self._drained: list[Flight] = []
        self._inbound_mark: int | None = None  # inbound turns to wait for after closing
        self._clock = QuiescenceClock(cap_s=timeout_s)

    def _on_data(self, news: RoomNews) -> None:
        if isinstance(news, InboundChunk):
            self._chunks.append(news)
            self._state = RoomState.TRANSFERRING

    @property
    def num_inflight(self) -> int:
        return sum(len(c.flight) for c in self._chunks)

    def _refresh(self) -> None:
        for chunk in self._chunks:
            error = chunk.error or chunk.flight.collect()
            if error is not None:
                self._fail(f"chunk {chunk.chunk_index}: {error}", notify=True)
                return
            if len(chunk.flight) == 0:
                self._landed.add(chunk.chunk_index, chunk.is_last)
        self._chunks = [c for c in self._chunks if len(c.flight)]
        if self._landed.complete:
            self._succeed()

    def _release(self) -> None:
        self._inbound_mark = self._agent.inbound_turns + 2
        self._clock.released_reported()
        for chunk in self._chunks:
            self._agent.drain(chunk.flight, self.room)
            self._drained.append(chunk.flight)
        self._chunks = []

    def quiescent(self) -> bool:
        if not self._state.is_terminal or self._inbound_mark is None:
            return False
        self._drained = [f for f in self._drained if len(f)]
        settled = (
            not self._drained
            and self._agent.inbound_turns_routed >= self._inbound_mark
            and not self._agent.is_draining(self.room)
        )
        return settled or self._clock.capped(self.room, "posted receives")


class UcxAgent(RoomAgent, backend="ucx", sender=UcxSender, receiver=UcxReceiver):
    native_package = "ucxx"

    def __init__(self, config: TransferConfig, memory: KVMemory) -> None:
        super().__init__(config, memory)
        import ucxx._lib.libucxx as ucx_api

        self._api = ucx_api
        options = {"NET_DEVICES": config.ib_device} if config.ib_device else {}
        features = (ucx_api.Feature.TAG, ucx_api.Feature.AM, ucx_api.Feature.RMA, ucx_api.Feature.WAKEUP)
        self._context = ucx_api.UCXContext(options, feature_flags=features)
        self._worker = ucx_api.UCXWorker(self._context, enable_delayed_submission=True)
        if memory.device == "cuda":
            from ucxx._cuda_context import ensure_cuda_context

            self._worker.set_progress_thread_start_callback(ensure_cuda_context, cb_args=(memory.device_id,))
        self._worker.start_progress_thread(polling_mode=False)
        # RoomTable.is_closed is a plain dict lookup: safe from the service thread.
        self._inbound = InboundService(self._worker, memory, self.rooms.is_closed)
        self._listener = ucx_api.UCXListener.create(self._worker, config.port, self._on_connect)
        self._endpoints: dict[str, object] = {}
        self._tag_prefix = secrets.randbits(32) << 32
        self._tag_seq = 0
        self._draining: list[tuple[int | None, Flight]] = []  # (room, requests)
        self.inbound_turns_routed = 0  # inbound turns whose news progress() took in

    def _on_connect(self, conn_request) -> None:
        self._inbound.adopt(self._listener.create_endpoint_from_conn_request(conn_request, True))

    @property
    def port(self) -> int:
        return self._listener.port

    def _backend_metadata(self) -> bytes:
        return encode(UcxAddress(host=self.config.host, port=self._listener.port))

    def _connect(self, info: AgentInfo) -> None:
        address = decode_as(info.backend_metadata, UcxAddress)
        self._endpoints[info.name] = self._api.UCXEndpoint.create(self._worker, address.host, address.port, True)

    def _disconnect(self, name: str) -> None:
        endpoint = self._endpoints.pop(name, None)
        if endpoint is not None:
            try:
                endpoint.close()
            except Exception as exc:  # ucxx raises one class per UCS status
                logger.warning("closing the endpoint of %s: %s", name, exc)

    def next_tag(self) -> int:
        self._tag_seq = (self._tag_seq + 1) & 0xFFFFFFFF
        return self._tag_prefix | self._tag_seq

    def send_message(self, peer: str, msg: object, flight: Flight) -> None:
        from ucxx._lib.arr import Array

        buffer = Array(np.frombuffer(encode(msg), dtype=np.uint8))
        try:
            flight.add(self._endpoints[peer].am_send(buffer), buffer)
        except Exception as exc:  # ucxx raises one class per UCS status
            raise TransferError(f"cannot message {peer}: {exc}") from exc

    def notify(self, peer: str, notice: RoomNotice) -> None:
        flight = Flight()
        try:
            self.send_message(peer, notice, flight)
        except TransferError as exc:
            logger.warning("%s", exc)
        self.drain(flight)

    def send_tagged(self, peer: str, offsets: list[int], lengths: list[int], tags: list[int], flight: Flight) -> None:
        endpoint = self._endpoints[peer]
        try:
            for offset, length, tag in zip(offsets, lengths, tags, strict=True):
                buffer = byte_view(self.memory, offset, length)
                flight.add(endpoint.tag_send(buffer, self._api.UCXXTag(tag)), buffer)
        except Exception as exc:
            raise TransferError(f"cannot send to {peer}: {exc}") from exc

    def drain(self, flight: Flight, room: int | None = None) -> None:
        """Keep requests nobody waits for alive until UCX is done with them;
        ``room`` names the room whose pages they receive into."""
        if len(flight):
            self._draining.append((room, flight))

    def is_draining(self, room: int) -> bool:
        return any(r == room for r, _ in self._draining)

    @property
    def inbound_turns(self) -> int:
        return self._inbound.turns_done

    def progress(self) -> None:
        """Route the news the inbound service gathered; retire finished state."""
        turns = self._inbound.turns_done  # read first: every news of these turns is queued
        for news in self._inbound.take_news():
            self.route(news.room, news)
        self.inbound_turns_routed = turns
        self.expire_rooms()
        for _, flight in self._draining:
            flight.collect()
        self._draining = [(r, f) for r, f in self._draining if len(f)]

    def discard(self, news: RoomNews) -> None:
        if isinstance(news, InboundChunk):
            self.drain(news.flight, news.room)

    def _num_inflight(self) -> int:
        inflight = sum(len(f) for _, f in self._draining)
        return inflight + sum(h.num_inflight for h in self.rooms.handlers())

    def _shutdown(self) -> None:
        self._inbound.stop()
        for endpoint in list(self._endpoints.values()) + self._inbound.endpoints():
            try:
                endpoint.close()
            except Exception as exc:  # best effort while shutting down
                logger.debug("closing endpoint: %s", exc)
        self._worker.stop_progress_thread()
        self._endpoints, self._draining = {}, []
