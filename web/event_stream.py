"""A server-sent event response whose producer writes each event itself (front and router)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi.responses import Response
from pdserve.web.disconnect import until_disconnected
from starlette.types import ASGIApp, Receive, Scope, Send

Write = Callable[[bytes], Awaitable[None]]

# Where ``with_raw_send`` leaves the server's own ``send`` in the ASGI scope.
RAW_SEND = "pdserve.raw_send"


def with_raw_send(app: ASGIApp) -> ASGIApp:
    """Wrap the outermost app: an event stream's body chunks then go to the
    server's ``send`` directly, past the framework's per-message wrappers
    (error and exception middleware watch only the response start, which still
    passes through them)."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await app(scope, receive, send)

    return asgi


class EventStream(Response):
    """``produce(write)`` awaits ``write(event_bytes)`` per event.

    No iterator and no task group sit between the producer and the socket
    (Starlette's ``StreamingResponse`` costs ~15 us a chunk in them, as much
    as everything else a streamed token needs). A client that leaves cancels
    the producer, whose cleanup aborts its upstream work.
    """

    def __init__(self, produce: Callable[[Write], Awaitable[None]], status_code: int = 200,
                 media_type: str = "text/event-stream; charset=utf-8"):
        # Not Response.__init__: that would announce an empty body's Content-Length.
        self.status_code = status_code
        self.background = None
        self.raw_headers = [(b"content-type", media_type.encode("latin-1")), (b"cache-control", b"no-cache")]
        self._produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body_send = scope.get(RAW_SEND, send)

        async def write(event: bytes) -> None:
            await body_send({"type": "http.response.body", "body": event, "more_body": True})

        await until_disconnected(receive, self._produce(write))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
