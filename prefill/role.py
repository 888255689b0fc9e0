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
   is told the room is done. FAILED, timeout, abort or a lost D connection end
   the room: pages are released exactly once and the other side is told.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from pdserve.common.engine_role import EngineRole, register_role
from pdserve.common.pd_endpoint import PDEndpoint
from pdserve.common.pd_protocol import KVPagesRequest, PrefillDone, RoomAbort
from pdserve.common.request import Req
from pdserve.common.scheduler import ScheduledBatch
from pdserve.transfer.base import KVSender, LayoutMismatchError, RoomState
from pdserve.transfer.control import ControlServer

logger = logging.getLogger("pdserve.prefill")


@dataclass
class PrefillRoom:
    req: Req
    conn_id: int
    sender: KVSender
    num_pages_sent: int = 0
    last_sent: bool = False


class PrefillRole(EngineRole):
    # A decode side's page list arrives on the control channel, not the pipe:
    # an idle prefill engine must look at it promptly.
    idle_wait_s = 0.005

    def __init__(self, engine):
        super().__init__(engine)
        cfg = engine.cfg
        self.page_size = cfg.page_size
        self.timeout_s = cfg.disaggregation_timeout_s
        self.control = ControlServer(cfg.disaggregation_control_host, cfg.disaggregation_control_port)
        self.endpoint = PDEndpoint(cfg, engine.pool, self.control.address)
        self.waiting_reqs: dict[int, tuple[Req, float]] = {}  # room -> (request, deadline)
        self.waiting_pages: dict[int, tuple[int, KVPagesRequest, float]] = {}  # room -> (conn, msg, deadline)
        self.rooms: dict[int, PrefillRoom] = {}  # prefilling or transferring
        self.transferring: set[int] = set()
        # Rooms D gave up before this side saw the request: fail it on arrival.
        self.aborted_rooms: dict[int, float] = {}

    # ---- hooks ------------------------------------------------------------------
    def admit(self, req: Req) -> None:
        # The decode side samples from the second token on; this side samples one.
        req.params = replace(req.params, max_new_tokens=1)
        if self.aborted_rooms.pop(req.room, None) is not None:
            self.engine.fail(req, f"room {req.room} was aborted by the decode side", 502)
            return
        self.waiting_reqs[req.room] = (req, time.monotonic() + self.timeout_s)
        self._try_pair(req.room)

    def has_pending(self) -> bool:
        return bool(self.waiting_reqs or self.waiting_pages or self.rooms)

    def poll(self) -> None:
        for conn_id, msg in self.control.recv_nowait():
            self._on_message(conn_id, msg)
        for conn_id in self.control.closed_connections():
            for room, ctx in list(self.rooms.items()):
                if ctx.conn_id == conn_id:
                    self._fail_room(room, "decode instance disconnected", notify_peer=False)
        self._expire()
        for room in list(self.transferring):
            self._poll_transfer(room)
        for room, ctx in list(self.rooms.items()):
            if room not in self.transferring and ctx.sender.poll() == RoomState.FAILED:
                self._fail_room(room, ctx.sender.failure or "transfer failed", notify_peer=False)

    def after_step(self, batch: ScheduledBatch) -> None:
        if batch.is_decode:
            return
        for req in batch.reqs:
            ctx = self.rooms.get(req.room)
            if ctx is not None:
                self._send_ready_pages(ctx)

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
        )
        self.control.send(ctx.conn_id, first)
        self.transferring.add(req.room)
        return True

    def abort(self, rid: str) -> Req | None:
        for room, (req, _) in list(self.waiting_reqs.items()):
            if req.rid == rid:
                del self.waiting_reqs[room]
                return req
        for room, ctx in list(self.rooms.items()):
            if ctx.req.rid == rid:
                self._end_room(room, abort_reason="aborted by client")
                return ctx.req
        return None

    def held_pages(self) -> set[int]:
        return {p for room in self.transferring for p in self.rooms[room].req.pages}

    def stats(self) -> dict:
        return {
            "instance_id": self.endpoint.instance_id,
            "num_bootstrapping_rooms": len(self.waiting_reqs) + len(self.waiting_pages),
            "num_transferring_rooms": len(self.transferring),
            "num_prefill_rooms": len(self.rooms),
        }

    def close(self) -> None:
        self.control.close()
        self.endpoint.close()

    # ---- pairing ------------------------------------------------------------------
    def _on_message(self, conn_id: int, msg: object) -> None:
        if isinstance(msg, KVPagesRequest):
            self.waiting_pages[msg.room] = (conn_id, msg, time.monotonic() + self.timeout_s)
            self._try_pair(msg.room)
        elif isinstance(msg, RoomAbort):
            self._on_peer_abort(msg)
            # Acknowledge: D keeps the room's pages until it knows no WRITE will follow.
            self.control.send(conn_id, RoomAbort(msg.room, "abort acknowledged"))
        else:
            logger.warning("prefill control channel ignores %s", type(msg).__name__)

    def _try_pair(self, room: int) -> None:
        if room not in self.waiting_reqs or room not in self.waiting_pages:
            return
        req, _ = self.waiting_reqs.pop(room)
        conn_id, msg, _ = self.waiting_pages.pop(room)
        expected = -(-len(req.prompt_ids) // self.page_size)
        problem = None
        if len(msg.dst_pages) != expected or msg.num_prompt_tokens != len(req.prompt_ids):
            problem = (
                f"decode side expects {msg.num_prompt_tokens} prompt tokens in {len(msg.dst_pages)} pages, "
                f"prefill side has {len(req.prompt_ids)} tokens in {expected} pages"
            )
        try:
            peer = self.endpoint.agent.add_peer(msg.peer_info)
        except LayoutMismatchError as exc:
            problem = str(exc)
        if problem is not None:
            self.control.send(conn_id, RoomAbort(room, problem))
            self.engine.fail(req, problem, 500)
            return
        sender = self.endpoint.agent.create_sender(room, peer, msg.dst_pages, self.timeout_s)
        self.rooms[room] = PrefillRoom(req, conn_id, sender)
        self.engine.scheduler.add(req)

    def _expire(self) -> None:
        now = time.monotonic()
        for room, expiry in list(self.aborted_rooms.items()):
            if now > expiry:
                del self.aborted_rooms[room]
        for room, (req, deadline) in list(self.waiting_reqs.items()):
            if now > deadline:
                del self.waiting_reqs[room]
                self.engine.fail(req, f"no decode instance asked for room {room} within {self.timeout_s}s", 504)
        for room, (conn_id, _, deadline) in list(self.waiting_pages.items()):
            if now > deadline:
                del self.waiting_pages[room]
                self.control.send(conn_id, RoomAbort(room, "the prefill side never received this request"))

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
            ctx.sender.send(req.pages[ctx.num_pages_sent : ready], ctx.num_pages_sent, is_last=done)
            ctx.num_pages_sent = ready
            ctx.last_sent = done

    def _poll_transfer(self, room: int) -> None:
        ctx = self.rooms[room]
        state = ctx.sender.poll()
        if state == RoomState.SUCCESS:
            self._end_room(room, abort_reason=None)
            ctx.req.finish_reason = ctx.req.finish_reason or "length"
            self.engine.emit(ctx.req)
        elif state == RoomState.FAILED:
            self._fail_room(room, ctx.sender.failure or "transfer failed", notify_peer=False)

    def _on_peer_abort(self, msg: RoomAbort) -> None:
        if msg.room in self.waiting_pages:
            del self.waiting_pages[msg.room]
        if msg.room in self.rooms:
            self.rooms[msg.room].sender.on_peer_abort(msg.reason)
            self._fail_room(msg.room, f"decode side aborted: {msg.reason}", notify_peer=False)
        elif msg.room in self.waiting_reqs:
            req, _ = self.waiting_reqs.pop(msg.room)
            self.engine.fail(req, f"decode side aborted: {msg.reason}", 502)
        else:
            self.aborted_rooms[msg.room] = time.monotonic() + self.timeout_s

    def _fail_room(self, room: int, reason: str, notify_peer: bool) -> None:
        ctx = self.rooms.get(room)
        if ctx is None:
            return
        self._end_room(room, abort_reason=reason if notify_peer else None)
        logger.warning("room %d failed: %s", room, reason)
        self.engine.fail(ctx.req, reason, 502)

    def _end_room(self, room: int, abort_reason: str | None) -> None:
        """Release the room's pages exactly once, wherever the request is."""
        ctx = self.rooms.pop(room)
        self.transferring.discard(room)
        if abort_reason is not None:
            ctx.sender.abort()
            self.control.send(ctx.conn_id, RoomAbort(room, abort_reason))
        in_scheduler = self.engine.scheduler.remove(ctx.req.rid) is not None
        if ctx.req.pages:
            self.engine.scheduler.release(ctx.req, cache=abort_reason is None and not in_scheduler)


register_role("prefill")(PrefillRole)
