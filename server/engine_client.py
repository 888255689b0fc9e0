"""The HTTP front's handle on its engine process.

Starts the engine in a spawned process, sends it typed messages over a pipe,
and routes each output back to the asyncio queue of the request it belongs to.
A reader thread blocks on the pipe so the event loop never does.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import socket
import threading
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection

from pdserve.common import codec
from pdserve.common.config import ServerConfig
from pdserve.common.messages import (
    AbortRequest,
    ControlRequest,
    ControlResponse,
    EngineFailed,
    EngineReady,
    GenerateRequest,
    TokenBatch,
    TokenOutput,
)

# The engine process's entry point: (config, model directory, its end of the pipe,
# number of tokens the tokenizer can print). The CLI passes it in, so the front
# never imports the engine.
EngineMain = Callable[[ServerConfig, str, Connection, "int | None"], None]


class EngineUnavailable(RuntimeError):
    """The engine cannot answer: HTTP 503."""


class EngineDied(EngineUnavailable):
    pass


class EngineBusy(EngineUnavailable):
    """Alive, but it did not answer a control request in time (a step that long
    is one the watchdog is about to end)."""


class EngineClient:
    def __init__(self, cfg: ServerConfig, model_dir: str, engine_main: EngineMain, num_text_tokens: int | None = None):
        ctx = mp.get_context("spawn")
        self._conn, self._child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=engine_main, args=(cfg, model_dir, self._child_conn, num_text_tokens), name="pdserve-engine", daemon=True)
        self.ready: EngineReady | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._control: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dead = False

    def start(self, timeout_s: float) -> EngineReady:
        """Start the engine and block until it is ready; raise if it fails."""
        self.process.start()
        # Only the engine may hold its end: then closing ours is an EOF it sees at once.
        self._child_conn.close()
        if not self._conn.poll(timeout_s):
            self.process.kill()
            raise EngineDied(f"engine did not start within {timeout_s:.0f}s")
        msg = codec.decode(self._conn.recv_bytes())
        if isinstance(msg, EngineFailed):
            raise EngineDied(msg.error)
        assert isinstance(msg, EngineReady)
        self.ready = msg
        return msg

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        threading.Thread(target=self._read_loop, name="engine-reader", daemon=True).start()

    def alive(self) -> bool:
        return not self.dead and self.process.is_alive()

    def _send(self, msg: object) -> None:
        data = codec.encode(msg)
        with self._send_lock:
            self._conn.send_bytes(data)

    def _read_loop(self) -> None:
        try:
            while True:
                msg = codec.decode(self._conn.recv_bytes())
                self._loop.call_soon_threadsafe(self._dispatch, msg)
        except (EOFError, OSError, TypeError):
            # TypeError: shutdown() closed the pipe under a blocked recv_bytes().
            if not self._loop.is_closed():
                try:
                    self._loop.call_soon_threadsafe(self._on_death)
                except RuntimeError:  # the loop closed in between
                    pass

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, TokenBatch):
            for out in msg.outputs:
                queue = self._queues.get(out.rid)
                if queue is not None:
                    queue.put_nowait(out)
        elif isinstance(msg, ControlResponse):
            fut = self._control.pop(msg.req_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _on_death(self) -> None:
        self.dead = True
        for rid, queue in self._queues.items():
            queue.put_nowait(TokenOutput(rid=rid, token_ids=[], finish_reason="abort", error="engine process died", error_status=503))
        for fut in self._control.values():
            if not fut.done():
                fut.set_exception(EngineDied("engine process died"))

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """Yield the engine's outputs for one request until it finishes.

        Leaving the iteration early (client gone, stop string hit) aborts the
        request in the engine, which frees its pages.
        """
        if not self.alive():
            raise EngineDied("engine is not running")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[req.rid] = queue
        finished = False
        try:
            self._send(req)
            while True:
                out: TokenOutput = await queue.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(req.rid, None)
            if not finished and self.alive():
                self._send(AbortRequest(rid=req.rid))

    async def control(self, kind: str, timeout_s: float = 30.0) -> ControlResponse:
        if not self.alive():
            raise EngineDied("engine is not running")
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._control[req_id] = fut
        self._send(ControlRequest(req_id=req_id, kind=kind))
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError as exc:
            raise EngineBusy(f"the engine did not answer {kind!r} within {timeout_s:g} s") from exc
        finally:
            self._control.pop(req_id, None)

    def shutdown(self) -> None:
        try:
            # close() alone leaves the socket open while the reader thread blocks on
            # it, so the engine would never see EOF; shutdown() wakes both sides.
            with socket.fromfd(self._conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            self._conn.close()
        except OSError:
            pass
        if self.process.pid is None:  # the server failed before the engine was started
            return
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
