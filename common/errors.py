"""OpenAI-style error objects and the exception that carries them.

How an HTTP service answers with them (responses, handlers, JSON bodies) is
``web/errors.py``'s."""

from __future__ import annotations

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "BadRequestError",
    429: "RateLimitError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}
# Overload answers (408, 429, 503) tell the client when to try again; a second is
# about how long a busy queue takes to move (RFC 9110 section 10.2.3).
RETRY_AFTER_S = 1
_RETRY_STATUSES = (408, 429, 503)


def retry_after_headers(status: int, retry_after_s: int | None = None) -> dict[str, str]:
    """``Retry-After`` for an overload status (408, 429, 503), nothing for others."""
    if status not in _RETRY_STATUSES:
        return {}
    return {"Retry-After": str(RETRY_AFTER_S if retry_after_s is None else retry_after_s)}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "object": "error",
        "error": {
            "message": message,
            "type": _TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError"),
            "param": param,
            "code": code if code is not None else status,
        },
    }


# The ``code`` of a decode instance's error when its room failed because of the
# prefill side (lost, aborted, never answered): the router then blames and
# avoids the prefill instance, not the decode one.
PREFILL_FAILED_CODE = "prefill_failed"


def error_code(body: bytes) -> object:
    """The ``error.code`` of an OpenAI error body, or None."""
    import json

    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None
