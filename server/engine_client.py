"""The HTTP front's handle on its engine process.

Starts the engine in a spawned process and talks to it over a pipe of typed
msgpack messages. Once the engine is ready the front's end of the pipe is read
by the event loop itself (an asyncio protocol): an engine step's outputs are
dispatched to the mailboxes of their requests in the callback that receives
them, with no reader thread, no thread hand-off and no per-token queue objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import socket
import struct
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection

from pdserve.common import codec
from pdserve.common.config import ServerConfig
from pdserve.common.messages import (
    AbortRequest,
    ControlKind,
    ControlRequest,
    ControlResponse,
    EngineFailed,
    EngineReady,
    GenerateRequest,
    TokenBatch,
    TokenOutput,
)
from pdserve.web.lifeline import follow_connection

# The engine process's entry point: (config, model directory, its end of the pipe,
# number of tokens the tokenizer can print[, rank, links to the other ranks]).
# The CLI passes it in, so the front never imports the engine. Under tensor
# parallelism the same entry point runs every rank (engine/tp.py).
EngineMain = Callable[..., None]

logger = logging.getLogger("pdserve.server")

# What a request's mailbox holds: new token ids alone (the common case), or a
# full output (first tokens with prompt counts, logprobs, a finish, an error).
Update = list[int] | TokenOutput


class EngineUnavailable(RuntimeError):
    """The engine cannot answer: HTTP 503."""


class EngineDied(EngineUnavailable):
    pass


class EngineBusy(EngineUnavailable):
    """Alive, but it did not answer a control request in time (a step that long
    is one the watchdog is about to end)."""


class Mailbox:
    """One request's updates, in order; the consumer takes all that are waiting.

    Cheaper than an ``asyncio.Queue`` per request (no lock, one future only
    while the consumer waits), and a consumer that fell behind by a few engine
    steps gets them all in one go.
    """

    __slots__ = ("items", "_waiter")

    def __init__(self) -> None:
        self.items: deque[Update] = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item: Update) -> None:
        self.items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def take(self) -> list[Update]:
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        items = list(self.items)
        self.items.clear()
        return items


class _PipeProtocol(asyncio.Protocol):
    """Frames of ``multiprocessing.Connection``: a 4-byte big-endian length
    (-1, then 8 bytes, for a frame of 2 GiB or more), then the payload."""

    def __init__(self, on_message: Callable[[object], None], on_lost: Callable[[], None]) -> None:
        self._buf = bytearray()
        self._on_message = on_message
        self._on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        while len(buf) - start >= 4:
            (size,) = struct.unpack_from("!i", buf, start)
            head = 4
            if size == -1:
                if len(buf) - start < 12:
                    break
                (size,) = struct.unpack_from("!Q", buf, start + 4)
                head = 12
            if len(buf) - start < head + size:
                break
            payload = buf[start + head : start + head + size]  # one copy; msgpack reads a bytearray
            start += head + size
            self._on_message(codec.decode(payload))
        del buf[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


def frame(payload: bytes) -> bytes:
    """A payload framed as ``Connection.send_bytes`` frames it."""
    size = len(payload)
    head = struct.pack("!i", size) if size < 0x7FFFFFFF else struct.pack("!iQ", -1, size)
    return head + payload


def _engine_process(engine_main: EngineMain, lifeline: Connection, cfg: ServerConfig, model_dir: str,
                    conn: Connection, num_text_tokens: int | None, *rank_args: object) -> None:
    """The engine process: its main, plus a watch that ends it when the front dies.

    The engine also exits on its pipe's end of file, but only once it reads the
    pipe again: not while it loads a model or runs a long step. The lifeline is
    read by a thread of its own, so a front killed by any signal takes its engine
    along at once. (PR_SET_PDEATHSIG would not do: it follows the thread that
    started the engine, which ends once the engine is up.)
    """
    follow_connection(lifeline, "the front")
    engine_main(cfg, model_dir, conn, num_text_tokens, *rank_args)
    # Done: leave without finalizing the interpreter, whose collection of the
    # engine's heap takes seconds (the front waits for this exit on shutdown).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class EngineClient:
    def __init__(self, cfg: ServerConfig, model_dir: str, engine_main: EngineMain, num_text_tokens: int | None = None):
        ctx = mp.get_context("spawn")
        self._conn, self._child_conn = ctx.Pipe(duplex=True)
        # The front holds the lifeline's write end until it exits; it never writes.
        self._lifeline_child, self._lifeline = ctx.Pipe(duplex=False)
        links, self.rank_processes, self._rank_ends = self._rank_pipes(ctx, cfg, model_dir, engine_main,
                                                                       self._lifeline_child)
        self.process = ctx.Process(
            target=_engine_process, name="pdserve-engine", daemon=True,
            args=(engine_main, self._lifeline_child, cfg, model_dir, self._child_conn, num_text_tokens,
                  *((0, links) if links else ())))
        self.ready: EngineReady | None = None
        self._boxes: dict[str, Mailbox] = {}
        self._control: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._transport: asyncio.Transport | None = None
        self._sock: socket.socket | None = None
        self.dead = False
        self.stopping = False  # the front is shutting down: the engine's exit is expected
        self._cfg = cfg
        self._poll_limit = 0  # set once the engine is ready: see _keep_polling
        self._spinning = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def _rank_pipes(ctx, cfg: ServerConfig, model_dir: str, engine_main: EngineMain,
                    lifeline: Connection) -> tuple[list, list, list]:
        """Ranks 1..N-1 of a tensor-parallel instance: rank 0's (step pipe,
        liveness pipe) per follower, the follower processes (each following the
        front's ``lifeline`` too), and every pipe end this process must close
        once they started (so only the ranks hold them)."""
        links, processes, ends = [], [], []
        for rank in range(1, cfg.tp_size):
            lead, follower = ctx.Pipe(duplex=True)
            alive_read, alive_write = ctx.Pipe(duplex=False)
            links.append((lead, alive_read))
            processes.append(ctx.Process(target=_engine_process,
                                         args=(engine_main, lifeline, cfg, model_dir, follower, None, rank, (alive_write,)),
                                         name=f"pdserve-engine-rank{rank}", daemon=True))
            ends += [lead, follower, alive_read, alive_write]
        return links, processes, ends

    def start(self, timeout_s: float) -> EngineReady:
        """Start the engine and block until it is ready; raise if it fails."""
        self.process.start()
        for proc in self.rank_processes:
            proc.start()
        # Only the engine may hold its ends: then closing ours is an EOF it sees at once.
        self._child_conn.close()
        self._lifeline_child.close()
        for end in self._rank_ends:
            end.close()
        if not self._conn.poll(timeout_s):
            self._kill_all()
            raise EngineDied(f"engine did not start within {timeout_s:.0f}s")
        msg = codec.decode(self._conn.recv_bytes())
        if isinstance(msg, EngineFailed):
            self._kill_all()
            raise EngineDied(msg.error)
        assert isinstance(msg, EngineReady)
        self.ready = msg
        self._poll_limit = self._cfg.pipe_poll_limit(msg.device)
        return msg

    async def attach(self) -> None:
        """From now on the event loop reads and writes the pipe (call it in the loop)."""
        sock = self._sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        self._conn.close()
        loop = self._loop = asyncio.get_running_loop()
        protocol = _PipeProtocol(self._dispatch, self._on_death)
        self._transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)

    def alive(self) -> bool:
        return not self.dead and self._transport is not None and self.process.is_alive()

    def _send(self, msg: object) -> None:
        if self._transport is None or self._transport.is_closing():
            raise EngineDied("engine is not running")
        self._transport.write(frame(codec.encode(msg)))

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, TokenBatch):
            # Within one engine turn a request's full output (its first tokens)
            # precedes any plain tokens it got later in that turn.
            boxes = self._boxes
            for out in msg.outputs:
                box = boxes.get(out.rid)
                if box is not None:
                    box.put(out)
            for rid, ids in zip(msg.rids, msg.token_ids):
                box = boxes.get(rid)
                if box is not None:
                    box.put(ids)
        elif isinstance(msg, ControlResponse):
            fut = self._control.pop(msg.req_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def death_reason(self) -> str:
        """Why the engine is gone, with its exit code when it has one (a
        negative code is the signal that ended it)."""
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        return "engine process died" + (f" (exit code {code})" if code is not None else "")

    def _on_death(self) -> None:
        self.dead = True
        reason = self.death_reason()
        if self.stopping:
            logger.info("engine stopped with the server")
        else:
            logger.error("%s", reason)
        for rid, box in self._boxes.items():
            box.put(TokenOutput(rid=rid, token_ids=[], finish_reason="abort", error=reason, error_status=503))
        for fut in self._control.values():
            if not fut.done():
                fut.set_exception(EngineDied(reason))

    def open(self, req: GenerateRequest) -> Mailbox:
        """Send ``req`` to the engine; its updates arrive in the returned mailbox."""
        if not self.alive():
            raise EngineDied("engine is not running")
        box = self._boxes[req.rid] = Mailbox()
        try:
            self._send(req)
        except BaseException:
            self._boxes.pop(req.rid, None)
            raise
        self._start_polling()
        return box

    def _polls(self) -> bool:
        return 0 < len(self._boxes) <= self._poll_limit and not self.dead

    def _start_polling(self) -> None:
        if not self._spinning and self._polls():
            self._spinning = True
            self._loop.call_soon(self._keep_polling)

    def _keep_polling(self) -> None:
        """While a few requests are open (``pipe_poll_limit``), keep a callback
        ready so that the event loop polls its sockets instead of sleeping in
        them: a sleeping core takes 0.1-0.3 ms to wake for the engine's output
        on a GPU host. With many open, the loop sleeps: its wakes then serve
        many events each, and polling there gained no throughput in served
        runs (one series read less). None when idle (the next request wakes
        the loop): polling on for 0.5 s after the last request closed left
        the TTFT of requests sent one after another unchanged on an H100
        (14.03 ms with it, 13.98 without; benchmarks/results/README.md)."""
        if self._polls():
            self._loop.call_soon(self._keep_polling)
        else:
            self._spinning = False

    def close(self, rid: str, abort: bool) -> None:
        """Forget ``rid``'s mailbox; ``abort`` tells the engine to drop it and free its pages."""
        self._boxes.pop(rid, None)
        if abort and self.alive():
            self._send(AbortRequest(rid=rid))
        if self._loop is not None:
            self._start_polling()  # back down to a few open

    async def generate(self, req: GenerateRequest) -> AsyncIterator[list[Update]]:
        """Yield the engine's updates for one request, a list at a time, until it finishes.

        Leaving the iteration early (client gone, stop string hit) aborts the
        request in the engine, which frees its pages.
        """
        box = self.open(req)
        finished = False
        try:
            while not finished:
                updates = await box.take()
                last = updates[-1]
                finished = isinstance(last, TokenOutput) and last.finish_reason is not None
                yield updates
        finally:
            self.close(req.rid, abort=not finished)

    async def finish(self, req: GenerateRequest) -> TokenOutput:
        """Run ``req`` to its end; its last output (which carries any error)."""
        last: Update = []
        async for updates in self.generate(req):
            last = updates[-1]
        assert isinstance(last, TokenOutput)
        return last

    async def control(self, kind: ControlKind, timeout_s: float = 30.0) -> ControlResponse:
        if not self.alive():
            raise EngineDied("engine is not running")
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._control[req_id] = fut
        self._send(ControlRequest(req_id=req_id, kind=kind))
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError as exc:
            raise EngineBusy(f"the engine did not answer {kind.value!r} within {timeout_s:g} s") from exc
        finally:
            self._control.pop(req_id, None)

    def shutdown(self) -> None:
        self.stopping = True
        if self._transport is not None:
            # The transport closes its socket on a later turn of the event loop,
            # which the join below holds up: end the stream now, so the engine
            # sees EOF and exits at once (unless it is closed already: the
            # engine went first, e.g. its whole process group was signalled).
            if not self._transport.is_closing():
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
            self._transport.close()
        else:
            self._conn.close()
        if self.process.pid is None:  # the server failed before the engine was started
            return
        self.process.join(timeout=5)
        self._kill_all()

    def _kill_all(self) -> None:
        """Rank 0, then the other ranks (they exit by themselves once rank 0 is
        gone; this is for one stuck in a step)."""
        for proc in [self.process, *self.rank_processes]:
            if proc.pid is not None and proc.is_alive():
                proc.join(timeout=1 if proc is not self.process else 0)
                if proc.is_alive():
                    proc.kill()
