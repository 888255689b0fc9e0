"""OpenAI-style error objects and the exception that carries them."""

from __future__ import annotations

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "BadRequestError",
    429: "RateLimitError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

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


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(status, message, param, code), status_code=status)


async def read_json_object(request) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong."""
    import json

    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def install_error_handlers(app) -> None:
    """Every HTTP service of pdserve (instance, router, bootstrap) answers every
    failure with an OpenAI error object, never FastAPI's ``{"detail": ...}``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

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
