"""Request bodies as every pdserve HTTP service takes them: bounded in size.

``BodyLimit`` refuses a body over ``max_bytes`` with a 413 before the handler
reads it: a declared ``Content-Length`` over the limit is refused before a byte
of the body is read, and a chunked body is cut off as soon as it passes the
limit. What the body may hold is ``web/strict_json.py``'s to say.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pdserve.common.errors import APIError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(APIError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {max_bytes} bytes (--max-request-bytes)",
                         code="request_too_large")


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 at once.

    It wraps only ``receive``, so responses (each streamed chunk) pass untouched.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_413(send, self.max_bytes)
            return
        await self._with_counted_body(scope, receive, send)

    async def _with_counted_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the body as the handler reads it; past the limit the read raises
        :class:`BodyTooLarge`, which the handler's error handling turns into a 413,
        sent with ``Connection: close`` so that the server stops reading the rest.
        (A stream's body chunks bypass ``send`` here: see ``web/event_stream.py``.)"""
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def closing(message: Message) -> None:
            if received > self.max_bytes and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted, closing)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server itself refuses a malformed length
    return None


async def _send_413(send: Send, max_bytes: int) -> None:
    body = json.dumps(BodyTooLarge(max_bytes).body()).encode()
    # The unread body stays on the connection: close it rather than read it.
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
