"""An OpenAI-compatible test server that streams tokens at known times.

Every streamed request gets its first chunk ``ttft_s`` after it arrives and one
more chunk every ``chunk_interval_s``, each carrying ``tokens_per_chunk`` tokens
(the word ``tok`` per token), until ``max_tokens`` tokens are out. Chunks are sent
at absolute offsets from arrival, so lateness does not accumulate. Every
``fail_every``-th request (counting from 1, warmups included) gets an HTTP 500
OpenAI error; every ``stall_every``-th stalls ``stall_s`` before answering.

Serves ``/v1/completions``, ``/v1/chat/completions``, the native ``/generate``
(cumulative text and ``meta_info.completion_tokens`` per chunk), ``/v1/models``
and ``/get_model_info``. ``FakeServer`` runs it with uvicorn in a thread on a port
the OS picks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pdserve.common.errors import error_body
from pdserve.tests.support.server_thread import ServerThread

TOKEN_WORD = "tok"


@dataclass(frozen=True)
class FakeBehavior:
    ttft_s: float = 0.2
    chunk_interval_s: float = 0.05
    tokens_per_chunk: int = 1
    fail_every: int | None = None
    stall_every: int | None = None
    stall_s: float = 30.0
    report_usage: bool = True
    model_id: str = "fake-model"
    tokenizer_path: str | None = None


@dataclass
class FakeState:
    behavior: FakeBehavior
    num_requests: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)


def _prompt_tokens(body: dict[str, Any]) -> int:
    prompt = body.get("prompt", body.get("input_ids", body.get("text")))
    if prompt is None:
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    if isinstance(prompt, list):
        return len(prompt)
    return len(re.findall(r"\w+|[^\w\s]", str(prompt)))


def _chunk_sizes(total: int, per_chunk: int) -> list[int]:
    sizes = [per_chunk] * (total // per_chunk)
    return sizes + ([total % per_chunk] if total % per_chunk else [])


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _openai_chunk(kind: str, text: str, finish: str | None, model: str) -> dict[str, Any]:
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        return {"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text, "finish_reason": finish}
    return {"id": "c", "object": "text_completion", "model": model, "choices": [choice]}


async def _timed_chunks(b: FakeBehavior, total: int) -> AsyncIterator[tuple[int, int, bool]]:
    """(tokens in chunk, tokens so far, last?) at each chunk's scheduled time."""
    arrival = time.perf_counter()
    sizes = _chunk_sizes(total, b.tokens_per_chunk)
    so_far = 0
    for i, size in enumerate(sizes):
        due = arrival + b.ttft_s + i * b.chunk_interval_s
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        so_far += size
        yield size, so_far, i == len(sizes) - 1


async def _openai_stream(kind: str, body: dict[str, Any], b: FakeBehavior) -> AsyncIterator[bytes]:
    total = int(body.get("max_tokens") or 16)
    async for size, _, last in _timed_chunks(b, total):
        text = f"{TOKEN_WORD} " * size
        yield _sse(_openai_chunk(kind, text, "length" if last else None, b.model_id))
    if b.report_usage and (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": total,
                 "total_tokens": _prompt_tokens(body) + total}
        yield _sse({"id": "c", "object": "text_completion", "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"


async def _generate_stream(body: dict[str, Any], b: FakeBehavior) -> AsyncIterator[bytes]:
    total = int((body.get("sampling_params") or {}).get("max_new_tokens") or 16)
    async for _, so_far, last in _timed_chunks(b, total):
        meta = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": so_far,
                "finish_reason": {"type": "length", "length": total} if last else None}
        yield _sse({"text": f"{TOKEN_WORD} " * so_far, "output_ids": list(range(so_far)), "meta_info": meta})
    yield b"data: [DONE]\n\n"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


def create_app(state: FakeState) -> FastAPI:
    app = FastAPI()
    b = state.behavior

    async def handle(kind: str, request: Request) -> Any:
        body = await request.json()
        state.num_requests += 1
        state.bodies.append(body)
        n = state.num_requests
        if b.fail_every and n % b.fail_every == 0:
            return _error(500, f"injected failure of request {n}")
        if b.stall_every and n % b.stall_every == 0:
            await asyncio.sleep(b.stall_s)
        stream = _generate_stream(body, b) if kind == "generate" else _openai_stream(kind, body, b)
        return StreamingResponse(stream, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle("completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle("chat", request)

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        return await handle("generate", request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": b.model_id, "object": "model"}]}

    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        return {"model_path": b.model_id, "tokenizer_path": b.tokenizer_path}

    return app


class FakeServer(ServerThread):
    """Context manager: the fake server on ``host`` and a free port, in a thread."""

    def __init__(self, behavior: FakeBehavior | None = None, host: str = "127.0.0.1", keep_alive_s: float = 5.0) -> None:
        self.state = FakeState(behavior or FakeBehavior())
        super().__init__(create_app(self.state), host, timeout_keep_alive=keep_alive_s)
        self.base_url = self.url


def main(argv: list[str] | None = None) -> int:
    """Serve in the foreground: stands in for ``pdserve up`` in the study's tests.

    Flags the real launcher takes (``--num-prefill``, ``--model-path``, ...) are
    accepted and ignored.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-s", type=float, default=FakeBehavior.ttft_s)
    parser.add_argument("--chunk-interval-s", type=float, default=FakeBehavior.chunk_interval_s)
    ns, _ = parser.parse_known_args(argv)
    behavior = FakeBehavior(ttft_s=ns.ttft_s, chunk_interval_s=ns.chunk_interval_s)
    uvicorn.run(create_app(FakeState(behavior)), host=ns.host, port=ns.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
