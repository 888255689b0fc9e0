"""Prefill role: prefill rooms paired with a decode instance and write their KV to it.

Lifecycle of a room on the prefill side:

1. The router's request arrives from the front (``admit``) and waits in the
   bootstrap queue for the decode side's ``KVPagesRequest`` (either may come first).
2. Once both are here, the peer is loaded (layout checked), a sender is created,
   and the request joins the scheduler with ``max_new_tokens = 1``.
3. After every prefill step, the pages the step completed are written to D.
4. When prefill samples the first token, the last pages are written and D gets
   ``PrefillDone``; the request waits in the transfer queue holding its pages.
5. When the sender reports SUCCESS the pages go to the prefix cache and the front
   is told the room is done.
6. FAILED, timeout, a client abort, ``RoomAbort`` from D or a lost D connection
   end the room early (a lost connection at once: the room's pages are D's
   lease, and nobody else will ask for them). Its pages drain first: they are released, and D is sent
   ``RoomAbort`` (or the acknowledgement of D's), only once no posted WRITE can
   still read or write them. Pages are released exactly once on every path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from pdserve.common.messages import RoleStats
from pdserve.engine.request import Req
from pdserve.engine.role import EngineHandle, EngineRole
from pdserve.model.batch import ScheduledBatch
from pdserve.transfer.base import KVMemory, KVSender, LayoutMismatchError, RoomState
from pdserve.transfer.control import ControlClosedError, ControlServer
from pdserve.transfer.endpoint import PDEndpoint, new_epoch
from pdserve.transfer.metrics import PREFILL_QUEUES, bytes_per_page
from pdserve.transfer.pd_messages import (
    KVPagesRequest,
    PeerHello,
    PrefillDone,
    RoomAbort,
    RoomsInPrefill,
)
from pdserve.transfer.tp import follower_transfer as tp_follower_transfer

logger = logging.getLogger("pdserve.prefill")
# RoomsInPrefill rounds per --disaggregation-timeout-s: a room's deadline is
# restarted well before it passes, even if a step or two delays a round.
KEEPALIVES_PER_TIMEOUT = 4
# A room is kept alive this many timeouts after pairing at most, so that one
# starved in the queue (under a policy other than first come, first served)
# still ends.
MAX_BACKLOG_TIMEOUTS = 10


@dataclass
class PrefillRoom:
    req: Req
    conn_id: int
    sender: KVSender
    paired_s: float = 0.0
    num_pages_sent: int = 0
    last_sent: bool = False
    first_post_s: float | None = None  # when its first pages were posted


@dataclass
class DrainingRoom:
    """An ended room whose WRITEs may still be in flight."""

    sender: KVSender
    pages: list[int]
    conn_id: int
    notice: RoomAbort | None  # sent to D once drained


class PrefillRole(EngineRole):
    # A decode side's page list arrives on the control channel, not the pipe:
    # an idle prefill engine must look at it promptly.
    idle_wait_s = 0.005
    # What a follower rank of a tensor-parallel instance moves of each room.
    follower_transfer = staticmethod(tp_follower_transfer)

    def __init__(self, engine: EngineHandle):
        super().__init__(engine)
        cfg = engine.cfg
        self.page_size = cfg.page_size
        self.timeout_s = cfg.disaggregation_timeout_s
        epoch = new_epoch()
        self.control = ControlServer(cfg.disaggregation_control_host, cfg.disaggregation_control_port,
                                     greeting=PeerHello(instance_id=cfg.instance_id, epoch=epoch))
        self.endpoint = PDEndpoint(cfg, KVMemory.from_tensor(engine.pool.buffer, engine.pool.layout), self.control.address, epoch,
                                   PREFILL_QUEUES, followers=engine.followers)
        self.agent = self.endpoint.agent
        self.metrics = self.endpoint.metrics
        self.instance_id = self.endpoint.instance_id
        self.waiting_reqs: dict[int, tuple[Req, float]] = {}  # room -> (request, deadline)
        self.waiting_pages: dict[int, tuple[int, KVPagesRequest, float]] = {}  # room -> (conn, msg, deadline)
        self.rooms: dict[int, PrefillRoom] = {}  # prefilling or transferring
        self.transferring: set[int] = set()
        self.draining: dict[int, DrainingRoom] = {}
        # Rooms D gave up before this side saw the request: fail it on arrival.
        self.aborted_rooms: dict[int, float] = {}
        # Transfer peers by the control connections that used them; a peer none
        # of whose connections is open is removed once its rooms have drained,
        # so a decode instance that died or restarted leaves nothing held here.
        self.peer_conns: dict[str, set[int]] = {}
        self.bytes_per_page = bytes_per_page(engine.pool.layout)
        self.kept_alive_s = time.monotonic()  # the last RoomsInPrefill round

    # ---- hooks ------------------------------------------------------------------
    def admit(self, req: Req) -> None:
        # The decode side samples from the second token on; this side samples one.
        req.params = replace(req.params, max_new_tokens=1)
        if self.aborted_rooms.pop(req.room, None) is not None:
            self.engine.fail(req, f"room {req.room} was aborted by the decode side", 502)
            return
        if req.room in self.waiting_reqs or req.room in self.rooms:
            self.engine.fail(req, f"room {req.room} is already in use", 409)
            return
        self.waiting_reqs[req.room] = (req, time.monotonic() + self.timeout_s)
        self._try_pair(req.room)

    def has_pending(self) -> bool:
        return bool(self.waiting_reqs or self.waiting_pages or self.rooms or self.draining)

    def poll(self) -> None:
        for conn_id, msg in self.control.recv_nowait():
            self._on_message(conn_id, msg)
        for conn_id in self.control.closed_connections():
            self._on_disconnect(conn_id)
        self._expire()
        self._keep_backlog_alive()
        self.agent.progress()
        for room, ctx in list(self.rooms.items()):
            state = ctx.sender.poll(progress=False)
            if state == RoomState.SUCCESS and room in self.transferring:
                self._finish_room(room)
            elif state == RoomState.FAILED:
                self._fail_room(room, ctx.sender.failure or "transfer failed", notify_peer=False)
        for room, drain in list(self.draining.items()):
            if drain.sender.quiescent():
                self._drained(room)
        self._retire_peers()

    def after_step(self, batch: ScheduledBatch) -> None:
        if batch.is_decode:
            return
        num_rooms = num_pages = num_descriptors = 0
        for req in batch.reqs:
            ctx = self.rooms.get(req.room)
            if ctx is not None:
                before = (ctx.num_pages_sent, ctx.sender.num_descriptors)
                self._send_ready_pages(ctx)
                if ctx.num_pages_sent > before[0] or ctx.sender.num_descriptors > before[1]:
                    num_rooms += 1
                    num_pages += ctx.num_pages_sent - before[0]
                    num_descriptors += ctx.sender.num_descriptors - before[1]
        if num_rooms:
            self._log_transfer_batch(num_rooms, num_pages, num_descriptors)

    def on_finished(self, req: Req) -> bool:
        ctx = self.rooms.get(req.room)
        if ctx is None:
            return False
        self._send_ready_pages(ctx)
        first = PrefillDone(
            room=req.room,
            first_token_id=req.output_ids[0],
            logprob=req.logprobs[0] if req.logprobs else None,
            top_logprobs=[list(t) for t in req.top_logprobs[0]] if req.top_logprobs else None,
            cached_tokens=req.num_cached_tokens,
            stages_s=self._prefill_stages(ctx),
        )
        self.transferring.add(req.room)
        if not self._send(ctx.conn_id, first):
            self._fail_room(req.room, "decode instance disconnected", notify_peer=False)
        return True

    def abort(self, rid: str) -> Req | None:
        for room, (req, _) in list(self.waiting_reqs.items()):
            if req.rid == rid:
                del self.waiting_reqs[room]
                return req
        for room, ctx in list(self.rooms.items()):
            if ctx.req.rid == rid:
                self._end_room(room, notice=RoomAbort(room=room, reason="aborted by client"))
                return ctx.req
        return None

    def held_pages(self) -> set[int]:
        held = {p for room in self.transferring for p in self.rooms[room].req.pages}
        return held | {p for d in self.draining.values() for p in d.pages}

    def timing(self, req: Req, now_s: float) -> dict[str, float]:
        first = req.first_token_s if req.first_token_s is not None else now_s
        # kv_transfer here is what followed the first token until the pages landed.
        return {"prefill_queue": req.stages_s.get("prefill_queue", 0.0), "prefill": req.stages_s.get("prefill", 0.0),
                "kv_transfer": max(now_s - first, 0.0)}

    def stats(self) -> RoleStats:
        bootstrapping = len(self.waiting_reqs) + len(self.waiting_pages)
        transferring, draining = len(self.transferring), len(self.draining)
        queues = {"num_prefill_bootstrap_queue_reqs": bootstrapping, "num_prefill_inflight_queue_reqs": transferring,
                  "num_prefill_draining_rooms": draining}
        return self.endpoint.stats(queues, num_bootstrapping_rooms=bootstrapping, num_transferring_rooms=transferring,
                                   num_prefill_rooms=len(self.rooms), num_draining_rooms=draining)

    def close(self) -> None:
        self.control.close()
        self.endpoint.close()

    # ---- control channel ------------------------------------------------------------
    def _send(self, conn_id: int, msg: object) -> bool:
        """Send to a decode instance; a connection that is gone is not an error here."""
        try:
            self.control.send(conn_id, msg)
            return True
        except (ControlClosedError, KeyError, OSError):
            return False

    def _on_message(self, conn_id: int, msg: object) -> None:
        if isinstance(msg, KVPagesRequest):
            if msg.prefill_epoch != self.endpoint.epoch:  # meant for this instance before a restart
                self._send(conn_id, RoomAbort(room=msg.room, reason="the prefill instance restarted"))
                return
            if msg.room in self.waiting_pages or msg.room in self.rooms:
                self._send(conn_id, RoomAbort(room=msg.room, reason=f"room {msg.room} is already in use"))
                return
            self.waiting_pages[msg.room] = (conn_id, msg, time.monotonic() + self.timeout_s)
            self._try_pair(msg.room)
        elif isinstance(msg, RoomAbort):
            self._on_peer_abort(conn_id, msg)
        else:
            logger.warning("prefill control channel ignores %s", type(msg).__name__)

    def _on_disconnect(self, conn_id: int) -> None:
        for room, (c, _, _) in list(self.waiting_pages.items()):
            if c == conn_id:
                del self.waiting_pages[room]
        for room, ctx in list(self.rooms.items()):
            if ctx.conn_id == conn_id:
                self._fail_room(room, "decode instance disconnected", notify_peer=False)
        for name, conns in self.peer_conns.items():
            conns.discard(conn_id)
            if not conns:
                self.endpoint.retire_peer(name)

    def _retire_peers(self) -> None:
        busy = {ctx.sender.peer for ctx in self.rooms.values()} | {d.sender.peer for d in self.draining.values()}
        for name in self.endpoint.retire_idle_peers(busy):
            del self.peer_conns[name]

    # ---- pairing ------------------------------------------------------------------
    def _try_pair(self, room: int) -> None:
        if room not in self.waiting_reqs or room not in self.waiting_pages:
            return
        req, _ = self.waiting_reqs.pop(room)
        conn_id, msg, deadline = self.waiting_pages.pop(room)
        pages_arrived_s = deadline - self.timeout_s
        problem = self._pairing_problem(req, msg)
        sender = None
        if problem is None:
            try:
                peer = self.endpoint.add_peer(msg.peer_info)
                self.peer_conns.setdefault(peer, set()).add(conn_id)
                sender = self.agent.create_sender(room, peer, msg.dst_pages, self.timeout_s)
            except LayoutMismatchError as exc:
                problem = str(exc)
            except Exception as exc:  # a peer that cannot be loaded fails this room only
                problem = f"cannot reach the decode instance's transfer agent: {exc}"
        if problem is not None:
            self.metrics.bootstrap_failed()
            self._send(conn_id, RoomAbort(room=room, reason=problem))
            self.engine.fail(req, problem, 500)
            return
        now = time.monotonic()
        # How long D's page list waited here for the request (~0 when the request came
        # first: pairing then happens as the list arrives).
        req.stages_s["prefill_bootstrap"] = max(now - pages_arrived_s, 0.0)
        self.rooms[room] = PrefillRoom(req, conn_id, sender, paired_s=now)
        self.engine.scheduler.add(req)
        # D's deadline ran from its page list; this request may have come late.
        self._send(conn_id, RoomsInPrefill(rooms=[room]))

    def _pairing_problem(self, req: Req, msg: KVPagesRequest) -> str | None:
        expected = -(-len(req.prompt_ids) // self.page_size)
        if len(msg.dst_pages) == expected and msg.num_prompt_tokens == len(req.prompt_ids):
            return None
        return (
            f"decode side expects {msg.num_prompt_tokens} prompt tokens in {len(msg.dst_pages)} pages, "
            f"prefill side has {len(req.prompt_ids)} tokens in {expected} pages"
        )

    def _keep_backlog_alive(self) -> None:
        """Every quarter of the timeout, restart the deadline of each room whose
        prefill has not posted its last pages, here and on its decode side
        (``RoomsInPrefill``): a room waiting in this engine's queue is not
        late, only behind others. Sent from the engine's loop, so a stuck
        engine sends nothing and its rooms still time out; and for at most
        MAX_BACKLOG_TIMEOUTS timeouts after pairing. (At pairing itself the
        room is named at once: D's deadline ran from its page list.)"""
        now = time.monotonic()
        if now - self.kept_alive_s < self.timeout_s / KEEPALIVES_PER_TIMEOUT:
            return
        self.kept_alive_s = now
        by_conn: dict[int, list[int]] = {}
        oldest_paired_s = now - MAX_BACKLOG_TIMEOUTS * self.timeout_s
        for room, ctx in self.rooms.items():
            if not ctx.last_sent and ctx.paired_s > oldest_paired_s:
                ctx.sender.keep_alive()
                by_conn.setdefault(ctx.conn_id, []).append(room)
        for conn_id, rooms in by_conn.items():
            self._send(conn_id, RoomsInPrefill(rooms=rooms))

    def _expire(self) -> None:
        now = time.monotonic()
        for room, expiry in list(self.aborted_rooms.items()):
            if now > expiry:
                del self.aborted_rooms[room]
        for room, (req, deadline) in list(self.waiting_reqs.items()):
            if now > deadline:
                del self.waiting_reqs[room]
                self.metrics.bootstrap_failed()
                self.engine.fail(req, f"no decode instance asked for room {room} within {self.timeout_s}s", 504)
        for room, (conn_id, _, deadline) in list(self.waiting_pages.items()):
            if now > deadline:
                del self.waiting_pages[room]
                self._send(conn_id, RoomAbort(room=room, reason="the prefill side never received this request"))

    # ---- transfer ------------------------------------------------------------------
    def _send_ready_pages(self, ctx: PrefillRoom) -> None:
        if ctx.last_sent:
            return
        req = ctx.req
        prompt_len = len(req.prompt_ids)
        done = req.num_computed >= prompt_len
        # Whole pages only while prefill goes on; the partial last page once it is done.
        ready = -(-prompt_len // self.page_size) if done else req.num_computed // self.page_size
        if ready > ctx.num_pages_sent or done:
            if ctx.first_post_s is None:
                ctx.first_post_s = time.monotonic()
            ctx.sender.send(req.pages[ctx.num_pages_sent : ready], ctx.num_pages_sent, is_last=done)
            ctx.num_pages_sent = ready
            ctx.last_sent = done

    def _prefill_stages(self, ctx: PrefillRoom) -> dict[str, float]:
        req, now = ctx.req, time.monotonic()
        scheduled = req.scheduled_s if req.scheduled_s is not None else now
        first = req.first_token_s if req.first_token_s is not None else now
        req.stages_s["prefill_queue"] = max(scheduled - ctx.paired_s, 0.0)
        req.stages_s["prefill"] = max(first - scheduled, 0.0)
        return dict(req.stages_s)

    def _log_transfer_batch(self, num_rooms: int, num_pages: int, num_descriptors: int) -> None:
        logger.info(
            "KV transfer batch. #room: %d, #page: %d, #byte: %d, #descriptor: %d, #inflight-req: %d, #bootstrap-req: %d,",
            num_rooms, num_pages, num_pages * self.bytes_per_page, num_descriptors,
            len(self.transferring), len(self.waiting_reqs) + len(self.waiting_pages),
        )

    def _finish_room(self, room: int) -> None:
        ctx = self.rooms.pop(room)
        started = ctx.first_post_s if ctx.first_post_s is not None else ctx.paired_s
        self.metrics.transferred(ctx.num_pages_sent * self.bytes_per_page, time.monotonic() - started,
                                 ctx.sender.num_descriptors)
        self.transferring.discard(room)
        self.engine.scheduler.release(ctx.req)  # into the prefix cache
        ctx.req.finish_reason = ctx.req.finish_reason or "length"
        self.engine.emit(ctx.req)

    def _on_peer_abort(self, conn_id: int, msg: RoomAbort) -> None:
        ack = RoomAbort(room=msg.room, reason="abort acknowledged")
        self.waiting_pages.pop(msg.room, None)
        if msg.room in self.rooms:
            self.rooms[msg.room].sender.on_peer_abort(msg.reason)
            self._fail_room(msg.room, f"decode side aborted: {msg.reason}", notify_peer=False, ack=ack)
            return
        if msg.room in self.waiting_reqs:
            req, _ = self.waiting_reqs.pop(msg.room)
            self.engine.fail(req, f"decode side aborted: {msg.reason}", 502)
        elif msg.room not in self.draining:
            self.aborted_rooms[msg.room] = time.monotonic() + self.timeout_s
        if msg.room in self.draining:
            self.draining[msg.room].notice = ack  # acknowledged once drained
        else:
            self._send(conn_id, ack)

    def _fail_room(self, room: int, reason: str, notify_peer: bool, ack: RoomAbort | None = None) -> None:
        ctx = self.rooms.get(room)
        if ctx is None:
            return
        if ack is None:  # not D's own abort: this side's transfer failed
            self.metrics.failed()
        self._end_room(room, notice=RoomAbort(room=room, reason=reason) if notify_peer else ack)
        logger.warning("room %d failed: %s", room, reason)
        self.engine.fail(ctx.req, reason, 502)

    def _end_room(self, room: int, notice: RoomAbort | None) -> None:
        """End a room early: stop its sender, take the request out of the
        scheduler, and hold its pages until no WRITE can touch them."""
        ctx = self.rooms.pop(room)
        self.transferring.discard(room)
        ctx.sender.abort()
        self.engine.scheduler.remove(ctx.req.rid)
        self.draining[room] = DrainingRoom(ctx.sender, ctx.req.pages, ctx.conn_id, notice)
        ctx.req.pages = []

    def _drained(self, room: int) -> None:
        drain = self.draining.pop(room)
        self.engine.pool.release(drain.pages)
        if drain.notice is not None:
            self._send(drain.conn_id, drain.notice)
