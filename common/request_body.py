"""Request bodies as every pdserve HTTP service takes them: bounded in size, strict JSON.

``BodyLimit`` refuses a body over ``max_bytes`` with a 413 before the handler
reads it: a declared ``Content-Length`` over the limit is refused before a byte
of the body is read, and a chunked body is cut off as soon as it passes the limit.

``parse_json_object`` turns the bytes into a JSON object or raises a 400
:class:`APIError`. Python's ``json`` accepts more than JSON and more than later
steps can handle, so it also refuses, each as a 400: ``NaN``/``Infinity`` and
numbers that overflow a float (they would reach sampling parameters or be
re-encoded as ``null`` by orjson), integers too long to convert, nesting deeper
than :data:`MAX_JSON_DEPTH` (``repr``, orjson and recursion limits fail on deep
nesting long before ``json`` does), and strings holding lone surrogates
(``"\\ud800"``: valid JSON escapes that no UTF-8 encoder, tokenizer or JSON
response can carry).
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING

from pdserve.common.errors import APIError

if TYPE_CHECKING:  # the engine process imports the default above, not the web stack
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

# 16 MiB: a whole 128k-token context as JSON text even at ~64 bytes a token
# (escaped non-ASCII text costs 6 bytes a character), or a 1M-token prompt as
# token ids (at most 8 bytes each, separator included), with room to spare; far
# below what would let one request hold a front's memory or CPU for long.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64
# A \uD800-\uDFFF escape: only then can a parsed string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


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
        :class:`BodyTooLarge`, which the handler's error handling turns into a 413."""
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


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


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} does not fit a 64-bit float")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_object(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 that says what is wrong."""
    if not raw.strip():
        raise APIError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise APIError(400, f"request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    # Each container needs an opening bracket: with few of them the walk is skipped.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth_exceeds(body, MAX_JSON_DEPTH):
        raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
        raise APIError(400, "request body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")
    return body


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _children(node: object) -> list:
    if isinstance(node, dict):
        return [v for v in node.values() if isinstance(v, (dict, list))]
    if isinstance(node, list):
        return [v for v in node if isinstance(v, (dict, list))]
    return []


def _depth_exceeds(root: object, limit: int) -> bool:
    """Whether containers nest more than ``limit`` deep (iterative: no recursion)."""
    level, depth = [root], 1
    while level:
        if depth > limit:
            return True
        level = [child for node in level for child in _children(node)]
        depth += 1
    return False


def _has_lone_surrogate(root: object) -> bool:
    try:
        # Parsed pairs are already joined into one character; what is left alone fails to encode.
        json.dumps(root, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
