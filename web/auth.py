"""Keys and secrets: how a request proves it has one, how a config shows them.

pdserve knows two credentials. The API key (``--api-key``) is what clients of
an HTTP front (an instance or the router) present. The cluster secret
(``--cluster-secret``) is what pdserve's own processes present to the bootstrap
service. Both travel as ``Authorization: Bearer TOKEN``; the scheme is matched
in any case and the token compared in constant time. Where a secret is read
from (flag, file, environment) is ``common/args.py``'s ``read_secret``.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable


def _as_bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    try:  # Starlette decodes header bytes as latin-1: this gives them back
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def bearer_token(header: str | bytes | None) -> bytes | None:
    """TOKEN of an ``Authorization: Bearer TOKEN`` header (``bearer``, ``BEARER``, ... too)."""
    if header is None:
        return None
    scheme, _, token = _as_bytes(header).strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip()


def key_matches(header: str | bytes | None, key: str) -> bool:
    """Whether the Authorization header carries ``key``, compared in constant time."""
    token = bearer_token(header)
    return token is not None and hmac.compare_digest(token, key.encode("utf-8"))


def bearer_headers(key: str | None) -> dict[str, str]:
    """The header that presents ``key``; none for no key."""
    return {"Authorization": f"Bearer {key}"} if key else {}


# Config fields that hold credentials: shown set or unset, never by value.
SECRET_FIELDS = ("api_key", "worker_api_key", "cluster_secret")


def redacted(values: dict) -> dict:
    """A config's fields (``dataclasses.asdict``) with every credential that is set
    replaced by ``"<redacted>"``."""
    return {k: "<redacted>" if k in SECRET_FIELDS and v else v for k, v in values.items()}


API_KEY_MESSAGE = "invalid or missing API key (expected 'Authorization: Bearer KEY')"


class BearerAuthMiddleware:
    """401 for any HTTP request without ``Authorization: Bearer KEY``, but on ``open_paths``.

    Plain ASGI on purpose: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``)
    swallows the client's disconnect message, so a handler polling
    ``request.is_disconnected()`` would never see a client leave.
    """

    def __init__(self, app, key: str, open_paths: Iterable[str], message: str) -> None:
        self.app = app
        self.key = key
        self.open_paths = frozenset(open_paths)
        self.message = message

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            if not key_matches(header, self.key):
                from pdserve.web.errors import error_response  # (fastapi: only where a front runs)

                await error_response(401, self.message, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)
