"""A fake serving instance for router, bootstrap and launcher tests.

It speaks the instance contract (``/health``, ``/get_server_info``, the three
generation endpoints in SSE and JSON, a prefill side that answers with a small
JSON) without a model, records every request it gets, and can be told to fail,
slow down or break its stream. Run it in a thread with :func:`start_fake`,
or as ``python -m pdserve.tests.support.fake_worker`` with ``pdserve serve``'s flags.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pdserve.bootstrap.client import BootstrapClient
from pdserve.bootstrap.protocol import InstanceInfo, encode_peer_info
from pdserve.common import env
from pdserve.common.errors import error_body
from pdserve.common.kv_layout import KVLayout
from pdserve.tests.support.server_thread import ServerThread
from pdserve.web.auth import key_matches

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate")


@dataclass
class Behavior:
    """Knobs a test may change at any time."""

    healthy: bool = True
    fail_status: int | None = None  # answer generation requests with this error
    fail_code: str | None = None  # ... whose error object has this code
    num_failures: int | None = None  # fail only this many times; None: always
    delay_s: float = 0.0  # before answering (decode: before the response headers)
    num_chunks: int = 3
    chunk_delay_s: float = 0.0
    break_after_chunks: int | None = None  # drop the connection mid-stream
    num_running_reqs: int = 0
    num_queued_reqs: int = 0
    api_key: str | None = None  # like --api-key: every path but /health wants it
    busy: bool = False  # /flush_cache refuses, as with requests running
    health_delay_s: float = 0.0  # before /health answers (a front too busy to answer in time)


@dataclass
class FakeWorker:
    role: str = "decode"  # "prefill" | "decode" | "null"
    name: str = "fake"
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    model: str = "fake-model"
    behavior: Behavior = field(default_factory=Behavior)
    requests: list[dict[str, Any]] = field(default_factory=list)  # {"path", "body"}
    num_aborted_streams: int = 0
    stream_aborted: threading.Event = field(default_factory=threading.Event)
    num_cancelled: int = 0  # requests whose client left during ``delay_s``
    cancelled: threading.Event = field(default_factory=threading.Event)

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if path is None or r["path"] == path]

    def server_info(self) -> dict[str, Any]:
        b = self.behavior
        return {"instance_id": self.instance_id, "disaggregation_mode": self.role,
                "num_running_reqs": b.num_running_reqs, "num_queued_reqs": b.num_queued_reqs,
                "kv_pool": {"page_size": 16, "total_pages": 64, "free_pages": 64,
                            "cached_pages": 0, "used_pages": 0}}

    def _should_fail(self) -> bool:
        b = self.behavior
        if b.fail_status is None or b.num_failures == 0:
            return False
        if b.num_failures is not None:
            b.num_failures -= 1
        return True

    def tokens(self) -> list[str]:
        return [f"[{self.name}]"] + [f" tok{i}" for i in range(1, self.behavior.num_chunks)]

    def sse_bytes(self, path: str = "/v1/completions") -> bytes:
        """The whole stream a streamed request to ``path`` gets, unbroken."""
        return b"".join(_sse_event(path, token) for token in self.tokens()) + SSE_DONE


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code=code), status_code=status)


def _chunk(path: str, text: str) -> dict[str, Any]:
    if path == "/v1/chat/completions":
        return {"object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    if path == "/generate":
        return {"text": text, "meta_info": {}}
    return {"object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": None}]}


def _full(path: str, text: str) -> dict[str, Any]:
    if path == "/v1/chat/completions":
        message = {"role": "assistant", "content": text}
        return {"object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "length"}]}
    if path == "/generate":
        return {"text": text, "meta_info": {}}
    return {"object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": "length"}]}


SSE_DONE = b"data: [DONE]\n\n"


def _sse_event(path: str, text: str) -> bytes:
    return f"data: {json.dumps(_chunk(path, text))}\n\n".encode()


async def _sse(worker: FakeWorker, path: str) -> AsyncIterator[bytes]:
    finished = False
    try:
        for i, token in enumerate(worker.tokens()):
            if worker.behavior.break_after_chunks == i:
                raise ConnectionAbortedError("fake stream broken on purpose")
            if i and worker.behavior.chunk_delay_s:
                await asyncio.sleep(worker.behavior.chunk_delay_s)
            yield _sse_event(path, token)
        yield SSE_DONE
        finished = True
    finally:
        if not finished:
            worker.num_aborted_streams += 1
            worker.stream_aborted.set()


async def _pause(worker: FakeWorker, request: Request, delay_s: float) -> bool:
    """Sleep ``delay_s`` like a busy engine; False when the client left meanwhile."""
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            worker.num_cancelled += 1
            worker.cancelled.set()
            return False
        await asyncio.sleep(0.01)
    return True


async def _generate(worker: FakeWorker, request: Request) -> Response:
    body = json.loads(await request.body())
    worker.requests.append({"path": request.url.path, "body": body})
    if not await _pause(worker, request, worker.behavior.delay_s):
        return Response(status_code=499)
    if worker._should_fail():
        return _error(worker.behavior.fail_status or 500, f"{worker.name} failed on purpose", worker.behavior.fail_code)
    if worker.role == "prefill":
        return JSONResponse({"bootstrap_room": body.get("bootstrap_room"), "status": "ok"})
    if body.get("stream"):
        return StreamingResponse(_sse(worker, request.url.path), media_type="text/event-stream")
    return JSONResponse(_full(request.url.path, "".join(worker.tokens())))


class _KeyCheck:
    """``Behavior.api_key``, read at each request (plain ASGI: disconnects still reach handlers)."""

    def __init__(self, app, worker: FakeWorker) -> None:
        self.app = app
        self.worker = worker

    async def __call__(self, scope, receive, send) -> None:
        key = self.worker.behavior.api_key
        if scope["type"] == "http" and key and scope["path"] != "/health":
            header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            if not key_matches(header, key):
                await _error(401, "invalid or missing API key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(worker: FakeWorker) -> FastAPI:
    app = FastAPI()
    app.add_middleware(_KeyCheck, worker=worker)

    @app.get("/health")
    async def health() -> Response:
        await asyncio.sleep(worker.behavior.health_delay_s)
        return Response(status_code=200 if worker.behavior.healthy else 503)

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        return worker.server_info()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": worker.model, "object": "model"}]}

    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        return {"model_path": worker.model}

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        worker.requests.append({"path": "/flush_cache", "body": None})
        if worker.behavior.busy:  # as an instance with requests running refuses
            return _error(400, "Cache not flushed: cannot flush the cache while requests are running")
        return JSONResponse({"status": "ok"})

    async def generate(request: Request) -> Response:
        return await _generate(worker, request)

    for path in GENERATE_PATHS:
        app.add_api_route(path, generate, methods=["POST"])
    return app


def start_fake(role: str, name: str, **behavior: Any) -> tuple[FakeWorker, ServerThread]:
    worker = FakeWorker(role=role, name=name, behavior=Behavior(**behavior))
    return worker, ServerThread(create_app(worker)).start()


FAKE_LAYOUT = KVLayout(num_layers=4, num_pages=100, page_size=16, num_kv_heads=2, head_dim=64,
                       dtype="bfloat16")


def make_info(instance_id: str, role: str = "prefill", **changes: Any) -> InstanceInfo:
    """An InstanceInfo; ``changes`` may name InstanceInfo or KVLayout fields."""
    layout_fields = {k: changes.pop(k) for k in list(changes) if k in KVLayout.__dataclass_fields__}
    info = InstanceInfo(
        instance_id=instance_id, role=role, http_url=f"http://127.0.0.1:1/{instance_id}",
        control_address="127.0.0.1:2", transfer_backend="nixl",
        peer_info=encode_peer_info(b"\x00agent-metadata\xff"),
        kv_layout=dataclasses.replace(FAKE_LAYOUT, **layout_fields), model="tiny")
    return dataclasses.replace(info, **changes)


def _register_forever(worker: FakeWorker, url: str, bootstrap_url: str, backend: str) -> None:
    info = make_info(worker.instance_id, worker.role, http_url=url, transfer_backend=backend,
                     model=worker.model)
    client = BootstrapClient(bootstrap_url, secret=env.CLUSTER_SECRET.get())  # as `pdserve up` hands it
    client.register(info)
    threading.Thread(target=client.heartbeat_forever, args=(info, 1.0, threading.Event()),
                     daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Accept ``pdserve serve``'s flags, so the launcher can start fakes instead."""
    parser = argparse.ArgumentParser(prog="fake_worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--disaggregation-mode", default="null")
    parser.add_argument("--disaggregation-bootstrap-url", default=None)
    parser.add_argument("--disaggregation-transfer-backend", default="nixl")
    parser.add_argument("--model-path", default="fake-model")
    args, _ = parser.parse_known_args(argv)
    worker = FakeWorker(role=args.disaggregation_mode, name=f"{args.disaggregation_mode}-{args.port}",
                        model=args.model_path)
    url = f"http://{args.host}:{args.port}"
    if args.disaggregation_bootstrap_url:
        _register_forever(worker, url, args.disaggregation_bootstrap_url,
                          args.disaggregation_transfer_backend)
    uvicorn.run(create_app(worker), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
