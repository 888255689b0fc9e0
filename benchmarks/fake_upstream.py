"""A cheap fake OpenAI completions server, for measuring what a router costs.

A router relays SSE chunks between a client and an upstream; to measure the
router's own CPU per relayed token, the upstream must produce tokens at a
steady, known pace while costing as little CPU as possible itself. This server
is raw asyncio (no framework), HTTP/1.1 keep-alive, and serves:

- ``POST /v1/completions`` (also ``/v1/chat/completions`` and ``/generate``,
  answered in the completions format): with ``"stream": true`` it answers
  ``Transfer-Encoding: chunked`` SSE, one ``data: {completion chunk}`` event
  per token, ``max_tokens`` of them, token ``k`` due at
  ``first_tick + k * token_interval`` (an absolute schedule: a late tick sends
  every token that is due, each in its own event), then a usage chunk when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``. Streams
  share one tick grid, so one timer serves all of them, and every token chunk
  carries ``fake_sent_at_s``, the CLOCK_MONOTONIC time it was written (a
  client on the same host subtracts it from its own ``time.monotonic()`` to
  get the delivery delay). Without ``stream`` it answers the whole completion
  as one JSON document.
- ``GET /health``, ``/v1/models``, ``/get_model_info``, ``/get_server_info``.

Ports listed with ``--prefill-port`` play a prefill instance of a PD pair:
every POST there is answered at once with a small JSON document, so the
router's prefill leg costs the upstream next to nothing.

Example::

    python -m pdserve.benchmarks.fake_upstream --port 31000 --prefill-port 31001 \\
        --token-interval-ms 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from pdserve.common.args import add_dataclass_args, config_from_args, flag
from pdserve.common.errors import error_body

MODEL_NAME = "fake-model"
TOKEN_TEXT = " tok"
SENT_AT_KEY = "fake_sent_at_s"  # CLOCK_MONOTONIC seconds at which the token's event was written
MAX_HEADER_BYTES = 64 * 1024
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate")


@dataclass(frozen=True)
class FakeConfig:
    """Where the fake listens, how fast it streams and what it answers."""

    host: str = field(default="127.0.0.1", metadata=flag("bind address"))
    ports: tuple[int, ...] = field(default=(31000,), metadata=flag(
        "decode / colocated port(s)", flag="--port", nargs="+", metavar="PORT"))
    prefill_ports: tuple[int, ...] = field(default=(), metadata=flag(
        "port(s) that play prefill", flag="--prefill-port", nargs="*", metavar="PORT"))
    token_interval_ms: float = field(default=2.0, metadata=flag("time between two tokens of one stream"))
    model: str = field(default=MODEL_NAME, metadata=flag("model name served"))
    token_text: str = field(default=TOKEN_TEXT, metadata=flag("text of every token"))


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
        status.encode(), content_type, len(body))
    return head + body


def _json_response(payload: Any, status: str = "200 OK") -> bytes:
    return _response(status, json.dumps(payload).encode())


def _error_response(status: int, message: str) -> bytes:
    """An OpenAI error object, as every pdserve service answers a failure."""
    return _json_response(error_body(status, message), f"{status} {HTTPStatus(status).phrase}")


def _prompt_tokens(body: dict[str, Any]) -> int:
    prompt = body.get("prompt", body.get("input_ids", body.get("text", "")))
    if isinstance(prompt, list):
        return len(prompt[0]) if prompt and isinstance(prompt[0], list) else len(prompt)
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    return len(str(prompt).split())


def _max_tokens(body: dict[str, Any]) -> int:
    sampling = body.get("sampling_params") or {}
    value = body.get("max_tokens") or body.get("max_completion_tokens") or sampling.get("max_new_tokens")
    return max(1, int(value or 16))


@dataclass(frozen=True)
class EventTemplate:
    """One token's SSE event, split around its send timestamp."""

    head: bytes
    tail: bytes

    def render(self, stamp: bytes) -> bytes:
        return _chunked(self.head + stamp + self.tail)


@dataclass
class Stream:
    """One streaming response: token events from templates, sent as ticks come."""

    transport: asyncio.Transport
    token_event: EventTemplate
    last_event: EventTemplate
    tail: bytes
    num_tokens: int
    on_done: Callable[[], None]
    start_tick: int = 0
    sent: int = 0

    def send_due(self, tick: int, stamp: bytes) -> bool:
        """Send every token due by ``tick``; True when the stream is finished."""
        n = min(tick - self.start_tick, self.num_tokens) - self.sent
        if n <= 0:
            return False
        self.sent += n
        finished = self.sent == self.num_tokens
        data = self.token_event.render(stamp) * (n - 1)
        data += self.last_event.render(stamp) + self.tail if finished else self.token_event.render(stamp)
        if not self.transport.is_closing():
            self.transport.write(data)
        return finished


@dataclass
class Ticker:
    """One timer for every stream: tick ``k`` fires at ``origin + k * interval``.

    A stream added between ticks ``k - 1`` and ``k`` has its first token due at
    tick ``k`` and its ``i``-th at tick ``k + i - 1``.
    """

    loop: asyncio.AbstractEventLoop
    interval_s: float
    streams: dict[int, Stream] = field(default_factory=dict)
    origin_s: float = 0.0
    next_tick: int = 0
    handle: asyncio.TimerHandle | None = None

    def add(self, stream: Stream) -> None:
        if self.handle is None:
            self.origin_s = self.loop.time()
            self.next_tick = 1
            self.handle = self.loop.call_at(self.origin_s + self.interval_s, self.tick)
        stream.start_tick = self.next_tick - 1
        self.streams[id(stream)] = stream

    def discard(self, stream: Stream) -> None:
        self.streams.pop(id(stream), None)

    def tick(self) -> None:
        now_s = self.loop.time()
        due_tick = max(self.next_tick, int((now_s - self.origin_s) / self.interval_s))
        self.next_tick = due_tick + 1
        stamp = b"%.6f" % now_s
        for key, stream in list(self.streams.items()):
            if stream.send_due(due_tick, stamp):
                del self.streams[key]
                stream.on_done()
        if self.streams:
            self.handle = self.loop.call_at(self.origin_s + self.next_tick * self.interval_s, self.tick)
        else:
            self.handle = None


class Server:
    """Routes parsed requests to canned answers and streams."""

    def __init__(self, cfg: FakeConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.ticker = Ticker(loop, cfg.token_interval_ms / 1000.0)
        self.instance_id = f"fake-{uuid.uuid4().hex[:8]}"
        self.num_running_reqs = 0

    def get(self, path: str) -> bytes:
        if path == "/health" or path == "/health_generate":
            return _response("200 OK", b"", b"text/plain")
        if path == "/v1/models":
            return _json_response({"object": "list", "data": [
                {"id": self.cfg.model, "object": "model", "created": 0, "owned_by": "fake",
                 "max_model_len": 1 << 20}]})
        if path == "/get_model_info":
            return _json_response({"model_path": self.cfg.model, "tokenizer_path": None,
                                   "is_generation": True, "model_type": "llama"})
        if path == "/get_server_info":
            return _json_response(self.server_info())
        return _error_response(404, f"no route {path}")

    def server_info(self) -> dict[str, Any]:
        return {"model_path": self.cfg.model, "served_model_name": self.cfg.model,
                "instance_id": self.instance_id, "num_running_reqs": self.num_running_reqs,
                "num_queued_reqs": 0, "version": "fake", "status": "ready"}

    def completion_id(self) -> str:
        return f"cmpl-{uuid.uuid4().hex[:16]}"

    def full_completion(self, body: dict[str, Any]) -> bytes:
        n, prompt = _max_tokens(body), _prompt_tokens(body)
        return _json_response({
            "id": self.completion_id(), "object": "text_completion", "created": int(time.time()),
            "model": self.cfg.model,
            "choices": [{"index": 0, "text": self.cfg.token_text * n, "logprobs": None,
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n},
        })

    def prefill_answer(self, body: dict[str, Any]) -> bytes:
        prompt = _prompt_tokens(body)
        return _json_response({
            "id": self.completion_id(), "object": "text_completion", "created": int(time.time()),
            "model": self.cfg.model,
            "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt},
        })

    def open_stream(self, transport: asyncio.Transport, body: dict[str, Any],
                    on_done: Callable[[], None]) -> Stream:
        cid, created, n = self.completion_id(), int(time.time()), _max_tokens(body)

        def event(finish: str | None) -> EventTemplate:
            data = _sse({"id": cid, "object": "text_completion", "created": created, "model": self.cfg.model,
                         "choices": [{"index": 0, "text": self.cfg.token_text, "logprobs": None,
                                      "finish_reason": finish}], SENT_AT_KEY: 0})
            head, _, tail = data.rpartition(b"0")
            return EventTemplate(head, tail)

        tail = b""
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = _prompt_tokens(body)
            tail += _chunked(_sse({"id": cid, "object": "text_completion", "created": created,
                                   "model": self.cfg.model, "choices": [],
                                   "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                             "total_tokens": prompt + n}}))
        tail += _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        stream = Stream(transport, event(None), event("length"), tail, n, on_done)
        self.ticker.add(stream)
        return stream


class Connection(asyncio.Protocol):
    """One keep-alive connection; requests are answered one after another."""

    def __init__(self, server: Server, prefill: bool) -> None:
        self.server = server
        self.prefill = prefill
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.pending: list[tuple[str, str, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.server.ticker.discard(self.stream)
            self.server.num_running_reqs -= 1
            self.stream = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            request = self._parse_one()
            if request is None:
                break
            self.pending.append(request)
        self._serve_pending()

    def _parse_one(self) -> tuple[str, str, bytes] | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                self.transport.close()
            return None
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        method, path = head[0].split(" ")[:2]
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buffer) < end + 4 + length:
            return None
        body = self.buffer[end + 4:end + 4 + length]
        self.buffer = self.buffer[end + 4 + length:]
        return method, path.split("?")[0], body

    def _serve_pending(self) -> None:
        while self.pending and self.stream is None and not self.transport.is_closing():
            method, path, body = self.pending.pop(0)
            self._serve(method, path, body)

    def _serve(self, method: str, path: str, raw_body: bytes) -> None:
        if method == "GET":
            self.transport.write(self.server.get(path))
            return
        if method != "POST" or path not in GENERATION_PATHS:
            self.transport.write(_error_response(404, f"no route {method} {path}"))
            return
        try:
            body = json.loads(raw_body or b"{}")
        except ValueError:
            self.transport.write(_error_response(400, "bad JSON"))
            return
        if self.prefill:
            self.transport.write(self.server.prefill_answer(body))
        elif body.get("stream"):
            self._start_stream(body)
        else:
            self.transport.write(self.server.full_completion(body))

    def _start_stream(self, body: dict[str, Any]) -> None:
        self.server.num_running_reqs += 1
        self.stream = self.server.open_stream(self.transport, body, self._stream_done)

    def _stream_done(self) -> None:
        self.stream = None
        self.server.num_running_reqs -= 1
        self._serve_pending()


async def serve(cfg: FakeConfig, ready: asyncio.Event | None = None) -> None:
    """Serve on every port of ``cfg`` until cancelled."""
    loop = asyncio.get_running_loop()
    server = Server(cfg, loop)
    listeners = []
    for port, prefill in [(p, False) for p in cfg.ports] + [(p, True) for p in cfg.prefill_ports]:
        listeners.append(await loop.create_server(lambda prefill=prefill: Connection(server, prefill),
                                                  cfg.host, port, reuse_address=True, backlog=1024))
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        for listener in listeners:
            listener.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.fake_upstream",
                                description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, FakeConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(FakeConfig, build_parser().parse_args(argv))
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve(cfg))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    print(f"fake upstream on {cfg.host} ports {cfg.ports} prefill {cfg.prefill_ports}",
          file=sys.stderr, flush=True)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
