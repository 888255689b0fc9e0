"""One streamed request, timed: sends it, reads the SSE stream, returns a record.

Times come from ``time.perf_counter`` at the moment each ``data:`` line is read.
Nothing but reading is done while streams are in flight: a response becomes a
record (tokenizer counts included) only after the run, with :meth:`Sender.record`.
Counting a finished stream's chunks with the tokenizer at once took the client's
one event loop milliseconds per request, which delayed the reading (and the
timestamps) of every other stream's chunks at the end of a wave.
A chunk counts as content when it brings new text or new tokens; TTFT is the first
such chunk. How many tokens each chunk carries:

1. when every content chunk reports the cumulative output count (``/generate``'s
   ``meta_info.completion_tokens``, or a per-chunk OpenAI ``usage``), the differences;
2. otherwise the request's total (final ``usage.completion_tokens``, else the
   tokenizer's count of the whole text) spread over the chunks in proportion to
   each chunk's tokenizer count, at least one token per chunk.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from pdserve.benchmarks.backends import Backend, ChunkUpdate, RequestOptions
from pdserve.benchmarks.bench_tokenizer import Tokenizer
from pdserve.benchmarks.datasets import BenchRequest
from pdserve.benchmarks.metrics import RequestRecord, split_tokens

# Long non-streamed bodies and cumulative /generate chunks exceed aiohttp's 64 KiB default.
READ_BUFSIZE_BYTES = 16 * 1024 * 1024


@dataclass
class _Stream:
    """Mutable state while one response streams in."""

    times_s: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    tokens_so_far: list[int | None] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    phases_s: dict[str, float] | None = None

    def add(self, update: ChunkUpdate, at_s: float) -> None:
        if update.timing is not None:
            self.phases_s = dict(update.timing.get("phases_s") or {})
        if update.prompt_tokens is not None:
            self.prompt_tokens = update.prompt_tokens
        if update.completion_tokens is not None:
            self.completion_tokens = update.completion_tokens
        last = next((n for n in reversed(self.tokens_so_far) if n is not None), 0)
        more_tokens = update.tokens_so_far is not None and update.tokens_so_far > last
        if update.text or more_tokens:
            self.times_s.append(at_s)
            self.texts.append(update.text)
            self.tokens_so_far.append(update.tokens_so_far)


@dataclass(frozen=True)
class Response:
    """What one request's exchange left: its times and chunks, or its error."""

    index: int
    req: BenchRequest
    start_s: float  # since the run's start
    e2e_s: float
    stream: _Stream
    error: str | None


@dataclass(frozen=True)
class Sender:
    """Sends requests of one backend to one server; shared by every request of a run."""

    session: aiohttp.ClientSession
    base_url: str
    backend: Backend
    options: RequestOptions
    tokenizer: Tokenizer
    timeout_s: float
    headers: dict[str, str] = field(default_factory=dict)

    async def send(self, index: int, req: BenchRequest, run_start: float) -> Response:
        body = self.backend.build_body(req, self.options)
        start = time.perf_counter()
        stream = _Stream()
        error: str | None = None
        try:
            error = await asyncio.wait_for(self._exchange(body, stream, start), self.timeout_s)
        except asyncio.TimeoutError:
            error = f"timeout after {self.timeout_s:g} s"
        except (aiohttp.ClientError, json.JSONDecodeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        e2e_s = time.perf_counter() - start
        if error is None and not stream.times_s:
            error = "the stream ended without any output"
        return Response(index, req, start - run_start, e2e_s, stream, error)

    async def _exchange(self, body: dict, stream: _Stream, start: float) -> str | None:
        url = self.base_url.rstrip("/") + self.backend.path
        async with self.session.post(url, json=body, headers=self.headers) as resp:
            if resp.status != 200:
                return f"HTTP {resp.status}: {_error_message(await resp.text())}"
            parser = self.backend.new_parser()
            async for payload in _sse_payloads(resp):
                if payload == "[DONE]":
                    break
                update = parser.feed(json.loads(payload))
                if update.error is not None:
                    return f"stream error: {update.error}"
                stream.add(update, time.perf_counter() - start)
        return None

    def record(self, response: Response) -> RequestRecord:
        """The timed record of a finished exchange (call it once no stream is in flight)."""
        index, start_s, e2e_s, stream = response.index, response.start_s, response.e2e_s, response.stream
        if response.error is not None:
            return RequestRecord(index=index, success=False, start_s=start_s, e2e_s=e2e_s, error=response.error)
        chunk_tokens = self._chunk_tokens(stream)
        return RequestRecord(
            index=index,
            success=True,
            start_s=start_s,
            e2e_s=e2e_s,
            ttft_s=stream.times_s[0],
            chunk_times_s=tuple(stream.times_s),
            chunk_tokens=tuple(chunk_tokens),
            prompt_tokens=stream.prompt_tokens if stream.prompt_tokens is not None else response.req.prompt_len,
            output_tokens=stream.completion_tokens if stream.completion_tokens is not None else sum(chunk_tokens),
            phases_s=stream.phases_s,
        )

    def _chunk_tokens(self, stream: _Stream) -> list[int]:
        counts = stream.tokens_so_far
        if all(n is not None for n in counts):
            return [b - a for a, b in zip([0, *counts[:-1]], counts, strict=True)]  # type: ignore[operator]
        total = stream.completion_tokens
        if total is None:
            total = len(self.tokenizer.encode("".join(stream.texts)))
        weights = [float(len(self.tokenizer.encode(t)) or len(t)) for t in stream.texts]
        return split_tokens(total, weights)


async def _sse_payloads(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The payload of every ``data:`` line; other SSE fields and comments are skipped."""
    async for raw in resp.content:
        line = raw.decode("utf-8").strip()
        if line.startswith("data:"):
            yield line[len("data:"):].strip()


def _error_message(body: str) -> str:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return body[:500]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return body[:500]
