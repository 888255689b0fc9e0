"""Decode role: reserve pages, have a prefill instance fill them, then decode.

Lifecycle of a room on the decode side:

1. The router's request arrives from the front (``admit``) and waits in the
   prealloc queue until pages for its whole prompt can be reserved.
2. The prefill instance is looked up in the bootstrap service (cached), its
   transfer peer loaded (layout checked), a receiver created, and P is sent
   ``KVPagesRequest`` with the reserved page indices over the control channel.
3. The room waits for two things: the transfer layer's "all pages landed" and
   P's ``PrefillDone`` with the first token.
4. With both, the request joins the running decode batch as if it had been
   prefilled here, and its first token is streamed.
5. FAILED, timeout, a client abort, ``RoomAbort`` from P or a lost P connection
   end the room early. Its pages are quarantined: freed only once the receiver
   is quiescent and P has confirmed it writes no more (its ``RoomAbort`` or the
   acknowledgement of ours) or the room's deadline passed, so a late WRITE can
   never land in a page another request reuses. Pages are freed exactly once.

A request without a room (sent to this instance directly) is prefilled locally.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from pdserve.bootstrap.protocol import InstanceInfo
from pdserve.common.roles import Role
from pdserve.engine.request import Req
from pdserve.engine.role import EngineHandle, EngineRole
from pdserve.transfer.base import KVMemory, KVReceiver, LayoutMismatchError, RoomState
from pdserve.transfer.control import ControlClient, ControlClosedError
from pdserve.transfer.endpoint import PDEndpoint
from pdserve.transfer.pd_messages import KVPagesRequest, PrefillDone, RoomAbort

logger = logging.getLogger("pdserve.decode")


class RoomFailed(Exception):
    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


@dataclass
class PrefillPeer:
    info: InstanceInfo
    peer_name: str
    control: ControlClient


@dataclass
class DecodeRoom:
    req: Req
    peer: PrefillPeer
    receiver: KVReceiver
    deadline_s: float
    done: PrefillDone | None = None


@dataclass
class QuarantinedRoom:
    peer: PrefillPeer
    receiver: KVReceiver
    pages: list[int]
    deadline_s: float
    confirmed: bool  # P said it writes no more


class DecodeRole(EngineRole):
    def __init__(self, engine: EngineHandle):
        super().__init__(engine)
        cfg = engine.cfg
        self.page_size = cfg.page_size
        self.timeout_s = cfg.disaggregation_timeout_s
        # D listens nowhere: it dials each prefill instance's control server.
        memory = KVMemory.from_tensor(engine.pool.buffer, engine.pool.layout)
        self.endpoint = PDEndpoint(cfg, memory, control_address=f"{cfg.disaggregation_control_host}:0", followers=getattr(engine, "followers", None))
        self.agent = self.endpoint.agent
        self.instance_id = self.endpoint.instance_id
        self.prealloc: deque[tuple[Req, float]] = deque()
        self.rooms: dict[int, DecodeRoom] = {}
        self.peers: dict[str, PrefillPeer] = {}
        self.quarantine: dict[int, QuarantinedRoom] = {}

    # ---- hooks ------------------------------------------------------------------
    def admit(self, req: Req) -> None:
        if req.room is None:
            self.engine.scheduler.add(req)
            return
        self.prealloc.append((req, time.monotonic() + self.timeout_s))

    def has_pending(self) -> bool:
        return bool(self.prealloc or self.rooms or self.quarantine)

    def poll(self) -> None:
        self._drain_control()
        self._start_rooms()
        self.agent.progress()
        now = time.monotonic()
        for room, ctx in list(self.rooms.items()):
            state = ctx.receiver.poll(progress=False)
            if state == RoomState.FAILED:
                self._fail_room(room, RoomFailed(f"KV transfer failed: {ctx.receiver.failure}"), notify_peer=True)
            elif state == RoomState.SUCCESS and ctx.done is not None:
                self._start_decoding(room)
            elif now > ctx.deadline_s:
                self._fail_room(room, RoomFailed(f"room {room} timed out after {self.timeout_s}s", 504), notify_peer=True)
        for room, q in list(self.quarantine.items()):
            if (q.confirmed and q.receiver.quiescent()) or now > q.deadline_s:
                self._unquarantine(room)
        self._retire_peers()

    def abort(self, rid: str) -> Req | None:
        for item in list(self.prealloc):
            if item[0].rid == rid:
                self.prealloc.remove(item)
                return item[0]
        for room, ctx in list(self.rooms.items()):
            if ctx.req.rid == rid:
                self._end_room(room, notify_reason="aborted by client")
                return ctx.req
        return None

    def held_pages(self) -> set[int]:
        held = {p for ctx in self.rooms.values() for p in ctx.req.pages}
        return held | {p for q in self.quarantine.values() for p in q.pages}

    def stats(self) -> dict:
        return {
            "instance_id": self.instance_id,
            "num_prealloc_reqs": len(self.prealloc),
            "num_transferring_rooms": len(self.rooms),
            "num_quarantined_rooms": len(self.quarantine),
            "num_transfer_peers": self.agent.stats().num_peers,
        }

    def close(self) -> None:
        for peer in self.peers.values():
            peer.control.close()
        self.endpoint.close()

    # ---- starting rooms --------------------------------------------------------------
    def _start_rooms(self) -> None:
        now = time.monotonic()
        while self.prealloc:
            req, deadline = self.prealloc[0]
            if now > deadline:
                self.prealloc.popleft()
                self.engine.fail(req, f"no KV pages became free within {self.timeout_s}s", 503)
                continue
            if not self.engine.scheduler.reserve(req, len(req.prompt_ids)):
                return  # first come, first served: wait for pages
            self.prealloc.popleft()
            try:
                self._open_room(req)
            except RoomFailed as exc:
                self.engine.scheduler.release(req, cache=False)
                self.engine.fail(req, str(exc), exc.status)

    def _open_room(self, req: Req) -> None:
        if req.room in self.rooms or req.room in self.quarantine:
            raise RoomFailed(f"room {req.room} is already in use", 409)
        peer = self._peer(req.prefill_instance_id)
        try:
            receiver = self.agent.create_receiver(req.room, peer.peer_name, self.timeout_s)
        except Exception as exc:  # e.g. a room id the agent still remembers
            raise RoomFailed(f"cannot open room {req.room}: {exc}") from exc
        msg = KVPagesRequest(room=req.room, decode_instance_id=self.endpoint.instance_id, peer_info=self.endpoint.peer_info, dst_pages=list(req.pages), num_prompt_tokens=len(req.prompt_ids))
        try:
            peer.control.send(msg)
        except ControlClosedError as exc:
            receiver.abort()
            raise RoomFailed(f"prefill instance unreachable: {exc}") from exc
        self.rooms[req.room] = DecodeRoom(req, peer, receiver, time.monotonic() + self.timeout_s)

    def _peer(self, instance_id: str | None) -> PrefillPeer:
        if instance_id is None:
            raise RoomFailed("a PD request needs prefill_instance_id", 400)
        peer = self.peers.get(instance_id)
        if peer is not None and not peer.control.closed:
            return peer
        if peer is not None:
            self._drop_peer(instance_id)
        try:
            # Once per prefill instance; later rooms use the cached peer.
            info = self.endpoint.bootstrap.lookup(instance_id)
            if info is None or info.role != Role.PREFILL:
                raise RoomFailed(f"prefill instance {instance_id!r} is not registered at the bootstrap service")
            name = self.endpoint.add_peer(info.peer_info_bytes)
        except LayoutMismatchError as exc:
            raise RoomFailed(str(exc), 500) from exc
        except RoomFailed:
            raise
        except Exception as exc:  # bootstrap down, bad metadata, unreachable agent
            raise RoomFailed(f"cannot reach prefill instance {instance_id!r}: {exc}") from exc
        peer = PrefillPeer(info, name, ControlClient(info.control_address))
        self.peers[instance_id] = peer
        return peer

    def _drop_peer(self, instance_id: str) -> None:
        """Fail every room of a prefill instance whose control channel is gone."""
        peer = self.peers.pop(instance_id)
        reason = f"lost the prefill instance: {peer.control.error}"
        for room, ctx in list(self.rooms.items()):
            if ctx.peer is peer:
                self._fail_room(room, RoomFailed(reason), notify_peer=False)
        peer.control.close()
        self.endpoint.retire_peer(peer.peer_name)

    def _retire_peers(self) -> None:
        self.endpoint.retire_idle_peers(
            {ctx.peer.peer_name for ctx in self.rooms.values()} | {q.peer.peer_name for q in self.quarantine.values()})

    # ---- control channel --------------------------------------------------------------
    def _drain_control(self) -> None:
        for instance_id, peer in list(self.peers.items()):
            for msg in peer.control.recv_nowait():
                self._on_message(msg)
            if peer.control.closed:
                self._drop_peer(instance_id)

    def _on_message(self, msg: object) -> None:
        if isinstance(msg, PrefillDone):
            ctx = self.rooms.get(msg.room)
            if ctx is not None:
                ctx.done = msg
        elif isinstance(msg, RoomAbort):
            if msg.room in self.quarantine:  # P confirmed: nothing more will land
                self.quarantine[msg.room].confirmed = True
            elif msg.room in self.rooms:
                # P sends its own abort only after its writes drained.
                self._fail_room(msg.room, RoomFailed(f"prefill side aborted: {msg.reason}"), notify_peer=False, confirmed=True)
        else:
            logger.warning("decode control channel ignores %s", type(msg).__name__)

    # ---- ending rooms -------------------------------------------------------------------
    def _start_decoding(self, room: int) -> None:
        ctx = self.rooms.pop(room)
        req, done = ctx.req, ctx.done
        req.num_computed = len(req.prompt_ids)
        req.num_cached_tokens = done.cached_tokens
        req.output_ids.append(done.first_token_id)
        if req.params.logprobs and done.logprob is not None:
            req.logprobs.append(done.logprob)
            req.top_logprobs.append([tuple(t) for t in (done.top_logprobs or [])])
        req.first_token_s = req.last_token_s = time.monotonic()
        self.engine.check_finish(req, done.first_token_id)
        if req.finished:
            self.engine.scheduler.release(req)
        else:
            self.engine.scheduler.add_prefilled(req)
        self.engine.emit(req)

    def _fail_room(self, room: int, exc: RoomFailed, notify_peer: bool, confirmed: bool = False) -> None:
        ctx = self.rooms.get(room)
        if ctx is None:
            return
        self._end_room(room, notify_reason=str(exc) if notify_peer else None, confirmed=confirmed)
        logger.warning("room %d failed: %s", room, exc)
        self.engine.fail(ctx.req, str(exc), exc.status)

    def _end_room(self, room: int, notify_reason: str | None, confirmed: bool = False) -> None:
        ctx = self.rooms.pop(room)
        landed = ctx.receiver.poll(progress=False) == RoomState.SUCCESS
        ctx.receiver.abort()
        if notify_reason is not None and not ctx.peer.control.closed:
            try:
                ctx.peer.control.send(RoomAbort(room=room, reason=notify_reason))
            except ControlClosedError:
                pass
        if landed:  # every WRITE completed: nothing more can land
            self.engine.scheduler.release(ctx.req, cache=False)
            return
        self.quarantine[room] = QuarantinedRoom(ctx.peer, ctx.receiver, ctx.req.pages, time.monotonic() + self.timeout_s, confirmed)
        ctx.req.pages = []

    def _unquarantine(self, room: int) -> None:
        self.engine.pool.release(self.quarantine.pop(room).pages)
