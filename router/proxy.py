"""Forwarding one generation request: pick workers, send, relay, retry.

PD mode, one attempt:

1. Pick a prefill P and a decode D by policy, draw a 63-bit ``bootstrap_room``.
2. Send the same body plus ``bootstrap_room`` and ``prefill_instance_id`` to P
   and D at the same time.
3. Wait for D's first body chunk. If P fails first, D is closed and P's error
   is the answer. No byte has reached the client yet, so a connection error or
   a 5xx from either side moves on to another pair (up to ``max_retries``),
   avoiding the side that failed: D's error with code ``prefill_failed`` (its
   room failed because of P) blames P. A connection the worker closed while
   it sat in the pool (a keep-alive race) is retried once more, blaming nobody.
   When no first byte came within ``first_byte_timeout_s``, both sides are
   probed (``/health``); one that does not answer (frozen, overloaded) is
   blamed and the attempt moves on, while two live sides are waited for.
4. From D's first chunk on, the attempt is committed: D's SSE is relayed as
   bytes, whatever arrived in one read going out in one write, never parsed (or
   its JSON returned); P's answer only gets logged. A client that disconnects
   closes D's stream, which makes D abort the request.

Upstream requests go through aiohttp, whose C parser and ``iter_any`` reads cost
a fraction of a pure-Python client's per relayed chunk.

Colocated mode is the same with no P and no PD fields.

Journey: when the call asks for its timing (``"return_timing": true`` or the
header ``X-PDServe-Timing: 1``), D gets ``return_timing`` and the seconds the
router spent before sending it on (header ``X-PDServe-Router-S``), so D's answer
carries the whole journey without the router parsing what it relays.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from fastapi.responses import Response
from pdserve.common.errors import PREFILL_FAILED_CODE, error_body, error_code, retry_after_headers
from pdserve.router.config import RouterConfig
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import Policy, routing_text
from pdserve.router.workers import COLOCATED, DECODE, PREFILL, Worker, WorkerRegistry
from pdserve.web.errors import error_response
from pdserve.web.event_stream import EventStream, Write
from pdserve.web.tracing import ROUTER_TIME_HEADER, Tracer
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("pdserve.router.proxy")



@dataclass
class Call:
    """One client call as the router handles it, across its attempts."""

    path: str
    body: dict
    received_s: float  # monotonic, when the router got it
    want_timing: bool = False
    router_s: float = 0.0  # received -> sent to the decode (or colocated) worker, last attempt
    span: Any = None  # the call's trace span, when tracing
    trace_headers: dict[str, str] = field(default_factory=dict)  # its context, for the workers


@dataclass
class _Opened:
    """D's response, held back until it has produced its first chunk."""

    response: aiohttp.ClientResponse
    first_chunk: bytes
    sent_s: float


class _AttemptFailed(Exception):
    """The attempt failed before any byte reached the client."""

    def __init__(self, response: Response, culprit: Worker, retryable: bool, race: bool = False,
                 blames_prefill: bool = False) -> None:
        super().__init__(f"{culprit.role} {culprit.url}: {response.status_code}")
        self.response = response
        self.culprit = culprit
        self.retryable = retryable
        self.race = race  # a pooled connection closed under us: nobody's fault
        self.blames_prefill = blames_prefill  # D says its room failed because of P


# What an upstream call raises when the worker cannot be reached or breaks off.
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
_JSON = {"content-type": "application/json"}


def _failure_reason(exc: Exception) -> str:
    """What ``/workers`` shows as the worker's last error."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"unreachable: {exc.os_error}"
    return f"{type(exc).__name__}: {exc}"


_RACE_ERRNOS = (errno.ECONNRESET, errno.EPIPE)


def _is_race(exc: Exception) -> bool:
    """The worker closed a pooled connection as we used it; it never saw the request."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return (isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)
            and exc.errno in _RACE_ERRNOS)


def _is_refused(exc: Exception) -> bool:
    return isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ConnectionRefusedError)


def _upstream_error(worker: Worker, exc: Exception) -> _AttemptFailed:
    status = 504 if isinstance(exc, asyncio.TimeoutError) else 502
    message = f"{worker.role} worker {worker.url} failed: {type(exc).__name__}: {exc}"
    return _AttemptFailed(error_response(status, message), worker, retryable=True, race=_is_race(exc))


def _status_error(worker: Worker, status: int, body: bytes, headers: Mapping[str, str]) -> _AttemptFailed:
    # The worker's Retry-After (an overloaded instance) reaches the client as is.
    retry = {"Retry-After": headers["Retry-After"]} if "Retry-After" in headers else retry_after_headers(status)
    response = Response(content=body, status_code=status, media_type=headers.get("content-type"), headers=retry)
    blames_prefill = worker.role == DECODE and status >= 500 and error_code(body) == PREFILL_FAILED_CODE
    return _AttemptFailed(response, worker, retryable=status >= 500, blames_prefill=blames_prefill)


def _encode(fields: dict) -> bytes:
    try:
        return orjson.dumps(fields)
    except orjson.JSONEncodeError:
        # orjson stops at 64-bit integers; a wider one is the instance's to judge.
        return json.dumps(fields, ensure_ascii=False).encode()


class Forwarder:
    def __init__(self, config: RouterConfig, workers: WorkerRegistry, policies: dict[str, Policy],
                 session: aiohttp.ClientSession, metrics: RouterMetrics, tracer: Tracer | None = None) -> None:
        self._config = config
        self._tracer = tracer or Tracer("pdserve-router")
        self._workers = workers
        self._policies = policies
        self._session = session
        self._metrics = metrics
        self._background: set[asyncio.Task] = set()

    def shutdown_tracing(self) -> None:
        self._tracer.shutdown()

    async def forward(self, call: Call, headers: dict[str, str] | None = None) -> Response:
        """``headers``: the client's, whose trace context (if any) the call's span continues."""
        if self._tracer.enabled:
            call.span = self._tracer.start("pdserve.router", call.received_s, headers, {"http.route": call.path})
            call.trace_headers = self._tracer.headers(call.span)
        try:
            response = await self._forward(call)
        except BaseException:
            self._tracer.end(call.span)
            raise
        if not isinstance(response, _RelayResponse):  # a relay observes when it ends
            self._metrics.latency.labels(call.path).observe(time.monotonic() - call.received_s)
            self._tracer.end(call.span)
        return response

    async def _forward(self, call: Call) -> Response:
        path, body = call.path, call.body
        text, excluded = routing_text(body), set()
        failure: _AttemptFailed | None = None
        attempt, num_attempts, raced = 0, self._config.max_retries + 1, False
        while attempt < num_attempts:
            pair = self._pick(text, excluded)
            if pair is None:
                break
            if attempt:
                self._metrics.retries.labels(path).inc()
            attempt += 1
            try:
                return await self._attempt(call, *pair)
            except _AttemptFailed as exc:
                # A client's mistake (a 4xx the worker answers) is not the worker's fault: not a warning.
                logger.log(logging.WARNING if exc.retryable else logging.DEBUG, "attempt %d on %s failed",
                           attempt, exc)
                if exc.retryable and exc.culprit.role != PREFILL:  # P's are counted by its task
                    self._metrics.worker_errors.labels(exc.culprit.role, exc.culprit.url).inc()
                failure = exc
                if not exc.retryable:
                    break
                if exc.race and not raced:  # once per request, on the same pair, not counted
                    raced, num_attempts = True, num_attempts + 1
                    continue
                excluded.add(exc.culprit)
        if failure is not None:
            return failure.response
        return error_response(503, self._no_workers_message())

    def _no_workers_message(self) -> str:
        missing = [r for r in self._workers.roles if not self._workers.healthy(r)]
        return f"no healthy {' or '.join(missing) or 'untried'} workers available"

    def _pick(self, text: str, excluded: set[Worker]) -> tuple[Worker | None, Worker] | None:
        if self._config.mode == "colocated":
            worker = self._choose(COLOCATED, text, excluded)
            return (None, worker) if worker else None
        prefill = self._choose(PREFILL, text, excluded)
        decode = self._choose(DECODE, text, excluded)
        return (prefill, decode) if prefill and decode else None

    def _choose(self, role: str, text: str, excluded: set[Worker]) -> Worker | None:
        candidates = [w for w in self._workers.healthy(role) if w not in excluded]
        return self._policies[role].select(candidates, text) if candidates else None

    async def _attempt(self, call: Call, prefill: Worker | None, decode: Worker) -> Response:
        path, fields, headers = call.path, call.body, {**_JSON, **call.trace_headers}
        if call.want_timing:
            fields = {**fields, "return_timing": True}
        if prefill is not None:
            fields = {**fields, "bootstrap_room": secrets.randbits(63),
                      "prefill_instance_id": prefill.instance_id}
        payload = _encode(fields)
        prefill_task = self._start_prefill(prefill, path, payload, headers) if prefill else None
        decode.in_flight += 1
        call.router_s = time.monotonic() - call.received_s
        if call.want_timing:
            headers = {**headers, ROUTER_TIME_HEADER: repr(call.router_s)}
        try:
            opened = await self._open_decode(decode, path, payload, prefill, prefill_task, headers)
        except BaseException:
            decode.in_flight -= 1
            if prefill_task is not None:
                prefill_task.cancel()
            raise
        self._metrics.stages.labels("router_queue_and_pick").observe(call.router_s)
        self._tracer.phases(call.span, {"router_queue_and_pick": call.router_s}, call.received_s + call.router_s)
        return await self._respond(opened, decode, prefill_task, call)

    def _start_prefill(self, prefill: Worker, path: str, payload: bytes, headers: dict[str, str]) -> asyncio.Task:
        prefill.in_flight += 1
        self._metrics.worker_requests.labels(prefill.role, prefill.url).inc()
        sent_s = time.monotonic()
        task = asyncio.create_task(self._call_prefill(prefill, path, payload, headers))

        def done(t: asyncio.Task) -> None:
            prefill.in_flight -= 1
            self._background.discard(t)
            if t.cancelled():
                return
            self._metrics.worker_latency.labels(prefill.role, prefill.url).observe(time.monotonic() - sent_s)
            exc = t.exception()
            if exc is not None:
                fault = not isinstance(exc, _AttemptFailed) or exc.retryable
                logger.log(logging.WARNING if fault else logging.DEBUG, "prefill %s failed: %s", prefill.url, exc)
                if fault:
                    self._metrics.worker_errors.labels(prefill.role, prefill.url).inc()

        self._background.add(task)
        task.add_done_callback(done)
        return task

    async def _call_prefill(self, prefill: Worker, path: str, payload: bytes, headers: dict[str, str]) -> None:
        """Raises :class:`_AttemptFailed` when P fails; returns when P is done."""
        try:
            async with self._session.post(prefill.url + path, data=payload, headers=headers) as response:
                body = await response.read()
        except UPSTREAM_ERRORS as exc:
            self._count_failure(prefill, exc)
            raise _upstream_error(prefill, exc) from None
        if response.status < 500:
            prefill.last_answer_s = time.monotonic()
        if response.status >= 400:
            raise _status_error(prefill, response.status, body, response.headers)

    def _count_failure(self, worker: Worker, exc: Exception) -> None:
        """A connection-level failure counts toward marking the worker down; a
        keep-alive race does not, and a refused connection marks it down at once."""
        if not _is_race(exc):
            self._workers.mark_failed(worker, _failure_reason(exc), at_once=_is_refused(exc))

    async def _open_decode(self, decode: Worker, path: str, payload: bytes, prefill: Worker | None,
                           prefill_task: asyncio.Task | None, headers: dict[str, str]) -> _Opened:
        decode_task = asyncio.create_task(self._open(decode, path, payload, headers))
        pending = {decode_task} | ({prefill_task} if prefill_task else set())
        wait_s = self._config.first_byte_timeout_s or None
        try:
            while decode_task in pending:
                done, pending = await asyncio.wait(pending, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    await self._probe_stalled(prefill if prefill_task in pending else None, decode)
                elif decode_task not in done and prefill_task in done:
                    prefill_task.result()  # raises _AttemptFailed when P failed
            try:
                return decode_task.result()
            except _AttemptFailed as exc:
                if exc.blames_prefill and prefill is not None:
                    self._blame_prefill(exc, prefill, prefill_task)
                raise
        finally:
            if not decode_task.done():
                decode_task.cancel()
                await asyncio.gather(decode_task, return_exceptions=True)

    @staticmethod
    def _blame_prefill(exc: _AttemptFailed, prefill: Worker, prefill_task: asyncio.Task | None) -> None:
        """D failed its room because of P: P's own error, if it has one, is the answer."""
        if prefill_task is not None and prefill_task.done() and not prefill_task.cancelled():
            own = prefill_task.exception()
            if isinstance(own, _AttemptFailed):
                raise own
        exc.culprit = prefill

    async def _probe_stalled(self, prefill: Worker | None, decode: Worker) -> None:
        """No first byte within first_byte_timeout_s: raise _AttemptFailed naming a
        side that does not answer /health; return (keep waiting) if both do."""
        sides = [w for w in (prefill, decode) if w is not None]
        answers = await asyncio.gather(*(self._answers_health(w) for w in sides))
        for worker, ok in zip(sides, answers, strict=True):
            if not ok:
                # Excluded from this request only: concurrent requests stalled on the same
                # worker would otherwise count one outage many times; the checks decide.
                reason = f"no first byte within {self._config.first_byte_timeout_s}s and /health does not answer"
                worker.last_error = reason
                message = f"{worker.role} worker {worker.url}: {reason}"
                raise _AttemptFailed(error_response(504, message), worker, retryable=True)
        logger.info("attempt on %s slow to its first byte; both sides answer /health, waiting",
                    " and ".join(w.url for w in sides))

    async def _answers_health(self, worker: Worker) -> bool:
        """/health answers 200, or times out on a worker that is finishing other requests (busy, alive)."""
        timeout = aiohttp.ClientTimeout(total=self._config.health_check_timeout_s)
        try:
            async with self._session.get(worker.url + "/health", timeout=timeout) as response:
                return response.status == 200
        except asyncio.TimeoutError:
            return self._workers.answered_recently(worker)
        except UPSTREAM_ERRORS:
            return False

    async def _open(self, worker: Worker, path: str, payload: bytes, headers: dict[str, str]) -> _Opened:
        self._metrics.worker_requests.labels(worker.role, worker.url).inc()
        sent_s = time.monotonic()
        try:
            response = await self._session.post(worker.url + path, data=payload, headers=headers)
        except UPSTREAM_ERRORS as exc:
            self._count_failure(worker, exc)
            raise _upstream_error(worker, exc) from None
        try:
            if response.status >= 400:
                body = await response.read()
                raise _status_error(worker, response.status, body, response.headers)
            return _Opened(response, await response.content.readany(), sent_s)
        except UPSTREAM_ERRORS as exc:
            response.close()
            raise _upstream_error(worker, exc) from None
        except BaseException:
            response.close()
            raise

    async def _respond(self, opened: _Opened, decode: Worker, prefill_task: asyncio.Task | None,
                       call: Call) -> Response:
        content_type = opened.response.headers.get("content-type", "application/json")
        if content_type.startswith("text/event-stream"):
            relay = _Relay(opened, decode, prefill_task, call, self._metrics, self._tracer)
            return _RelayResponse(relay, status_code=opened.response.status, media_type=content_type)
        try:
            rest = await opened.response.read()
        except UPSTREAM_ERRORS as exc:
            raise _upstream_error(decode, exc) from None
        finally:
            opened.response.close()
            decode.in_flight -= 1
            now = time.monotonic()
            self._metrics.worker_latency.labels(decode.role, decode.url).observe(now - opened.sent_s)
        decode.last_answer_s = now
        return Response(content=opened.first_chunk + rest, status_code=opened.response.status,
                        media_type=content_type)


class _Relay:
    """D's committed SSE stream, relayed chunk by chunk; closes exactly once."""

    def __init__(self, opened: _Opened, decode: Worker, prefill_task: asyncio.Task | None,
                 call: Call, metrics: RouterMetrics, tracer: Tracer) -> None:
        self._opened = opened
        self._call = call
        self._tracer = tracer
        self._decode = decode
        self._prefill_task = prefill_task
        self._path = call.path
        self._received_s = call.received_s
        self._metrics = metrics
        self._finished = False
        self._closed = False

    async def relay(self, write: Write) -> None:
        try:
            await write(self._opened.first_chunk)
            async for chunk in self._opened.response.content.iter_any():
                await write(chunk)
            self._finished = True
        except UPSTREAM_ERRORS as exc:
            # Bytes already reached the client: no retry, end the stream with an error event.
            logger.warning("decode %s stream broke: %r", self._decode.url, exc)
            self._metrics.errors.labels(self._path, "502").inc()
            self._metrics.worker_errors.labels(self._decode.role, self._decode.url).inc()
            error = error_body(502, f"decode worker {self._decode.url} stream broke: {exc!r}")
            await write(b"data: " + orjson.dumps(error) + b"\n\ndata: [DONE]\n\n")
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closing (not releasing) the connection: an unfinished D sees its client go and aborts.
        self._opened.response.close()
        self._decode.in_flight -= 1
        now = time.monotonic()
        self._metrics.worker_latency.labels(self._decode.role, self._decode.url).observe(now - self._opened.sent_s)
        self._metrics.latency.labels(self._path).observe(now - self._received_s)
        self._tracer.end(self._call.span, now)
        if self._finished:
            self._decode.last_answer_s = now
        if not self._finished and self._prefill_task is not None:
            self._prefill_task.cancel()  # the client is gone or D broke: P's work is moot


class _RelayResponse(EventStream):
    """Closes the relay even when the client left before the first chunk was sent."""

    def __init__(self, relay: _Relay, status_code: int, media_type: str) -> None:
        super().__init__(relay.relay, status_code=status_code, media_type=media_type)
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._relay.close()
