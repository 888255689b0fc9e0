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
6. Pages are a lease on a live P: once P is known dead, its rooms' pages are
   freed as soon as their receivers are quiescent, not at the deadline. Known
   dead is: its control connection broke and its address refuses connections
   (nothing listens there any more), or it greets with another epoch than the
   one it registered with (a restart at the same address; ``PeerHello``), or
   its connection broke and the bootstrap service no longer lists it with the
   same epoch (its heartbeats stopped; ``watch_lost_peer``).

A room that fails because of the prefill side (lost, restarted, aborted, slow)
fails with the error code ``prefill_failed``, so the router blames and avoids
P, not this instance.

A request without a room (sent to this instance directly) is prefilled locally.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.bootstrap.protocol import InstanceInfo
from pdserve.common.errors import PREFILL_FAILED_CODE
from pdserve.common.messages import RoleStats
from pdserve.common.roles import Role
from pdserve.engine.request import Req
from pdserve.engine.role import EngineHandle, EngineRole, colocated_timing
from pdserve.transfer.base import KVMemory, KVReceiver, LayoutMismatchError, RoomState
from pdserve.transfer.control import ControlClient, ControlClosedError
from pdserve.transfer.endpoint import PDEndpoint, new_epoch
from pdserve.transfer.metrics import DECODE_QUEUES, bytes_per_page
from pdserve.transfer.pd_messages import (
    KVPagesRequest,
    PeerHello,
    PrefillDone,
    RoomAbort,
    RoomsInPrefill,
)
from pdserve.transfer.tp import follower_transfer as tp_follower_transfer

logger = logging.getLogger("pdserve.decode")


class RoomFailed(Exception):
    def __init__(self, message: str, status: int = 502, prefill_side: bool = False):
        super().__init__(message)
        self.status = status
        self.code = PREFILL_FAILED_CODE if prefill_side else None


def prefill_failed(message: str, status: int = 502) -> RoomFailed:
    """A room that failed because of its prefill instance."""
    return RoomFailed(message, status, prefill_side=True)


@dataclass
class PrefillPeer:
    info: InstanceInfo
    peer_name: str
    control: ControlClient
    dead: bool = False  # known dead: nothing it posted can still land


@dataclass
class DecodeRoom:
    req: Req
    peer: PrefillPeer
    receiver: KVReceiver
    deadline_s: float
    opened_s: float = 0.0
    done: PrefillDone | None = None


@dataclass
class QuarantinedRoom:
    peer: PrefillPeer
    receiver: KVReceiver
    pages: list[int]
    deadline_s: float
    confirmed: bool  # P said it writes no more


def watch_lost_peer(peer: PrefillPeer, lookup: Callable[[str], InstanceInfo | None], interval_s: float,
                    until_s: float, stop: threading.Event, clock: Callable[[], float] = time.monotonic) -> None:
    """Mark a prefill instance whose control connection broke dead once the
    bootstrap service no longer lists it (its entry expired: no heartbeats) or
    lists another epoch (it restarted). Gives up at ``until_s`` on ``clock``
    (the rooms' deadline frees their pages anyway) or when ``stop`` is set."""
    while clock() < until_s and not peer.dead and not stop.is_set():
        try:
            info = lookup(peer.info.instance_id)
        except Exception:  # an unreachable bootstrap service proves nothing
            info = peer.info
        if info is None or info.epoch != peer.info.epoch:
            logger.info("prefill instance %s (epoch %s) is gone from the bootstrap service",
                        peer.info.instance_id, peer.info.epoch)
            peer.dead = True
            return
        stop.wait(interval_s)


class DecodeRole(EngineRole):
    # What a follower rank of a tensor-parallel instance moves of each room.
    follower_transfer = staticmethod(tp_follower_transfer)

    def __init__(self, engine: EngineHandle):
        super().__init__(engine)
        cfg = engine.cfg
        self.page_size = cfg.page_size
        self.timeout_s = cfg.disaggregation_timeout_s
        # D listens nowhere: it dials each prefill instance's control server.
        memory = KVMemory.from_tensor(engine.pool.buffer, engine.pool.layout)
        self.endpoint = PDEndpoint(cfg, memory, control_address=f"{cfg.disaggregation_control_host}:0", epoch=new_epoch(),
                                   queues=DECODE_QUEUES, followers=engine.followers)
        self.agent = self.endpoint.agent
        self.metrics = self.endpoint.metrics
        self.instance_id = self.endpoint.instance_id
        self.prealloc: deque[tuple[Req, float]] = deque()
        self.rooms: dict[int, DecodeRoom] = {}
        self.peers: dict[str, PrefillPeer] = {}
        self.quarantine: dict[int, QuarantinedRoom] = {}
        self._stop = threading.Event()
        self.bytes_per_page = bytes_per_page(engine.pool.layout)

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
                self.metrics.failed()
                self._fail_room(room, prefill_failed(f"KV transfer failed: {ctx.receiver.failure}"), notify_peer=True)
            elif state == RoomState.SUCCESS and ctx.done is not None:
                self._start_decoding(room)
            elif now > ctx.deadline_s:
                self.metrics.failed()
                self._fail_room(room, prefill_failed(f"room {room} timed out after {self.timeout_s}s", 504), notify_peer=True)
        for room, q in list(self.quarantine.items()):
            if ((q.confirmed or q.peer.dead) and q.receiver.quiescent()) or now > q.deadline_s:
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

    def timing(self, req: Req, now_s: float) -> dict[str, float]:
        if req.room is None:  # prefilled here
            return colocated_timing(req, now_s)
        started = req.first_token_s if req.first_token_s is not None else now_s
        scheduled = req.scheduled_s if req.scheduled_s is not None else now_s
        return {**req.stages_s, "decode_queue": max(scheduled - started, 0.0), "decode": max(now_s - scheduled, 0.0)}

    def stats(self) -> RoleStats:
        prealloc, transferring, quarantined = len(self.prealloc), len(self.rooms), len(self.quarantine)
        queues = {"num_decode_prealloc_queue_reqs": prealloc, "num_decode_transfer_queue_reqs": transferring,
                  "num_decode_quarantined_rooms": quarantined}
        return self.endpoint.stats(queues, num_prealloc_reqs=prealloc, num_transferring_rooms=transferring,
                                   num_quarantined_rooms=quarantined)

    def close(self) -> None:
        self._stop.set()
        for peer in self.peers.values():
            peer.control.close()
        self.endpoint.close()

    # ---- starting rooms --------------------------------------------------------------
    def _start_rooms(self) -> None:
        now, num_opened = time.monotonic(), 0
        while self.prealloc:
            req, deadline = self.prealloc[0]
            if now > deadline:
                self.prealloc.popleft()
                self.engine.fail(req, f"no KV pages became free within {self.timeout_s}s", 503)
                continue
            if not self.engine.scheduler.reserve(req, len(req.prompt_ids)):
                break  # first come, first served: wait for pages
            self.prealloc.popleft()
            try:
                self._open_room(req)
                num_opened += 1
            except RoomFailed as exc:
                self.metrics.bootstrap_failed()
                self.engine.scheduler.release(req, cache=False)
                self.engine.fail(req, str(exc), exc.status, exc.code)
        if num_opened:
            self._log_rooms_waiting(num_opened)

    def _log_rooms_waiting(self, num_opened: int) -> None:
        logger.info(
            "Decode rooms waiting for KV. #new-room: %d, #transfer-req: %d, #prealloc-req: %d, #quarantined-room: %d,",
            num_opened, len(self.rooms), len(self.prealloc), len(self.quarantine),
        )

    def _open_room(self, req: Req) -> None:
        if req.room in self.rooms or req.room in self.quarantine:
            raise RoomFailed(f"room {req.room} is already in use", 409)
        peer = self._peer(req.prefill_instance_id)
        try:
            receiver = self.agent.create_receiver(req.room, peer.peer_name, self.timeout_s)
        except Exception as exc:  # e.g. a room id the agent still remembers
            raise RoomFailed(f"cannot open room {req.room}: {exc}") from exc
        msg = KVPagesRequest(room=req.room, prefill_epoch=peer.info.epoch, decode_instance_id=self.endpoint.instance_id,
                             peer_info=self.endpoint.peer_info, dst_pages=list(req.pages), num_prompt_tokens=len(req.prompt_ids))
        try:
            peer.control.send(msg)
        except ControlClosedError as exc:
            receiver.abort()
            raise prefill_failed(f"prefill instance unreachable: {exc}") from exc
        now = time.monotonic()
        req.stages_s["decode_wait_pages"] = max(now - req.arrival_s, 0.0)
        self.rooms[req.room] = DecodeRoom(req, peer, receiver, now + self.timeout_s, opened_s=now)

    def _peer(self, instance_id: str | None) -> PrefillPeer:
        if instance_id is None:
            raise RoomFailed("a PD request needs prefill_instance_id", 400)
        peer = self.peers.get(instance_id)
        if peer is not None and not peer.control.closed:
            return peer
        if peer is not None:
            self._drop_peer(instance_id, dead=peer.control.refused)
        try:
            # Once per prefill instance; later rooms use the cached peer.
            info = self.endpoint.bootstrap.lookup(instance_id)
            if info is None or info.role != Role.PREFILL:
                raise prefill_failed(f"prefill instance {instance_id!r} is not registered at the bootstrap service")
            name = self.endpoint.add_peer(info.peer_info_bytes)
        except LayoutMismatchError as exc:
            raise RoomFailed(str(exc), 500) from exc
        except RoomFailed:
            raise
        except Exception as exc:  # bootstrap down, bad metadata, unreachable agent
            raise prefill_failed(f"cannot reach prefill instance {instance_id!r}: {exc}") from exc
        peer = PrefillPeer(info, name, ControlClient(info.control_address, final_when_refused=True))
        self.peers[instance_id] = peer
        return peer

    def _drop_peer(self, instance_id: str, dead: bool, reason: str | None = None) -> None:
        """Fail every room of a prefill instance whose control channel is gone;
        a ``dead`` one also lets go of its quarantined pages once quiescent."""
        peer = self.peers.pop(instance_id)
        peer.dead = dead
        reason = reason or f"lost the prefill instance: {peer.control.error}"
        for room, ctx in list(self.rooms.items()):
            if ctx.peer is peer:
                self.metrics.failed()
                self._fail_room(room, prefill_failed(reason), notify_peer=False)
        peer.control.close()
        if not dead and any(q.peer is peer for q in self.quarantine.values()):
            # Lost, maybe not dead: the bootstrap service's view of its heartbeats decides.
            args = (peer, self.endpoint.bootstrap.lookup, self.engine.cfg.disaggregation_heartbeat_s,
                    time.monotonic() + self.timeout_s, self._stop)
            threading.Thread(target=watch_lost_peer, args=args, name="lost-prefill-watch", daemon=True).start()
        self.endpoint.retire_peer(peer.peer_name)

    def _retire_peers(self) -> None:
        self.endpoint.retire_idle_peers(
            {ctx.peer.peer_name for ctx in self.rooms.values()} | {q.peer.peer_name for q in self.quarantine.values()})

    # ---- control channel --------------------------------------------------------------
    def _drain_control(self) -> None:
        for instance_id, peer in list(self.peers.items()):
            for msg in peer.control.recv_nowait():
                if isinstance(msg, PeerHello) and msg.epoch != peer.info.epoch:
                    self._drop_peer(instance_id, dead=True, reason=f"prefill instance {instance_id!r} restarted")
                    break
                self._on_message(msg, peer)
            else:
                if peer.control.closed:
                    self._drop_peer(instance_id, dead=peer.control.refused)

    def _on_message(self, msg: object, peer: PrefillPeer) -> None:
        if isinstance(msg, PeerHello):
            pass  # this incarnation's greeting (another one is handled above)
        elif isinstance(msg, RoomsInPrefill):
            # Still queued or prefilling on P: not late, only behind others there.
            now = time.monotonic()
            for room in msg.rooms:
                ctx = self.rooms.get(room)
                if ctx is not None and ctx.peer is peer:
                    ctx.deadline_s = now + self.timeout_s
                    ctx.receiver.keep_alive()
        elif isinstance(msg, PrefillDone):
            ctx = self.rooms.get(msg.room)
            if ctx is not None:
                ctx.done = msg
        elif isinstance(msg, RoomAbort):
            if msg.room in self.quarantine:  # P confirmed: nothing more will land
                self.quarantine[msg.room].confirmed = True
            elif msg.room in self.rooms:
                # P sends its own abort only after its writes drained.
                self._fail_room(msg.room, prefill_failed(f"prefill side aborted: {msg.reason}"), notify_peer=False, confirmed=True)
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
        req.first_token_s = req.last_token_s = now = time.monotonic()
        self._record_transfer(ctx, now)
        self.engine.check_finish(req, done.first_token_id)
        if req.finished:
            self.engine.scheduler.release(req)
        else:
            self.engine.scheduler.add_prefilled(req)
        self.engine.emit(req)

    def _record_transfer(self, ctx: DecodeRoom, now_s: float) -> None:
        """Count the room's bytes and add P's phases to its journey; what the
        room waited beyond P's own phases is the transfer (and the messages)."""
        req = ctx.req
        num_pages = -(-len(req.prompt_ids) // self.page_size)
        self.metrics.transferred(num_pages * self.bytes_per_page)
        prefill_stages = {k: v for k, v in ctx.done.stages_s.items() if k in ("prefill_bootstrap", "prefill_queue", "prefill")}
        req.stages_s.update(prefill_stages)
        req.stages_s["kv_transfer"] = max(now_s - ctx.opened_s - sum(prefill_stages.values()), 0.0)

    def _fail_room(self, room: int, exc: RoomFailed, notify_peer: bool, confirmed: bool = False) -> None:
        ctx = self.rooms.get(room)
        if ctx is None:
            return
        self._end_room(room, notify_reason=str(exc) if notify_peer else None, confirmed=confirmed)
        logger.warning("room %d failed: %s", room, exc)
        self.engine.fail(ctx.req, str(exc), exc.status, exc.code)

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
