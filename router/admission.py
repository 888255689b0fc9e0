"""Overload control of the router's generation endpoints, as SGLang's gateway does it.

At most ``max_concurrent_requests`` generation requests are in flight (a
streamed one until its last byte is sent or its client leaves). Beyond that a
request waits in a FIFO queue of at most ``queue_size`` places, for at most
``queue_timeout_s``. A request that finds the queue full gets a 429, one that
waited too long a 408; both say ``Retry-After``. Nothing else changes: health,
admin and metrics endpoints are never queued.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque

from pdserve.common.errors import APIError, retry_after_headers
from starlette.types import ASGIApp, Receive, Scope, Send


class Admission:
    """A counting gate with a bounded, timed FIFO queue in front of it."""

    def __init__(self, max_concurrent: int, queue_size: int, queue_timeout_s: float) -> None:
        self._free = max_concurrent
        self._queue_size = queue_size
        self._queue_timeout_s = queue_timeout_s
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def num_queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if need be; APIError 429/408 when it cannot."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self._queue_size:
            raise APIError(429, f"too many requests: {self._queue_size} already wait for the router "
                                "(--max-concurrent-requests, --queue-size)", code="rate_limit_exceeded")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(self._queue_timeout_s, _expire, waiter)
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.TimeoutError:
            raise APIError(408, f"the request waited {self._queue_timeout_s:g} s in the router's queue "
                                "(--queue-timeout-s)", code="queue_timeout") from None
        except BaseException:
            # Cancelled (the client left) just after a slot was handed over: hand it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()
            raise
        finally:
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        """Give a slot back: straight to the oldest waiter still waiting, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class AdmissionMiddleware:
    """Plain ASGI around the app: a request on ``paths`` holds a slot while the
    app serves it, which for a stream lasts until the stream ends."""

    def __init__(self, app: ASGIApp, admission: Admission, paths: tuple[str, ...]) -> None:
        self.app = app
        self.admission = admission
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            await self.admission.acquire()
        except APIError as exc:
            await _send_error(send, exc)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.release()


async def _send_error(send: Send, exc: APIError) -> None:
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in retry_after_headers(exc.status).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
