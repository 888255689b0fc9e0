"""OpenAI-style error objects and the exception that carries them."""

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


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   retry_after_s: int | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=retry_after_headers(status, retry_after_s))


def parse_json_object(raw: bytes) -> dict:
    """A request body as a strict JSON object, or a 400 that says what is wrong."""
    from pdserve.common.strict_json import InvalidJSON, loads_object

    try:
        return loads_object(raw)
    except InvalidJSON as exc:
        raise APIError(400, str(exc)) from None


async def read_json_object(request) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong."""
    return parse_json_object(await request.body())


def install_error_handlers(app) -> None:
    """Every HTTP service of pdserve (instance, router, bootstrap) answers every
    failure with an OpenAI error object, never FastAPI's ``{"detail": ...}``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(400, f"invalid request body: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(HTTPException)
    async def _http(_, exc: HTTPException):
        # Unknown routes and methods included.
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(ClientDisconnect)
    async def _gone(_, exc: ClientDisconnect):
        # The client left (or was cut off for going quiet) before its request was read:
        # nobody reads this answer, and it is no server error to log.
        return error_response(499, "the client closed the connection before its request was read")

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


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
