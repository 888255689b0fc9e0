"""How every HTTP service of pdserve (instance, router, bootstrap) answers a failure:
an OpenAI error object (``common/errors.py``) as a JSON response, never FastAPI's
``{"detail": ...}``; and a request body read as a strict JSON object or a 400."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pdserve.common.errors import APIError, error_body, retry_after_headers
from pdserve.web.strict_json import InvalidJSON, loads_object


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   retry_after_s: int | None = None):
    headers = retry_after_headers(status, retry_after_s)
    if status == 401:  # RFC 9110: a 401 names the scheme that would be accepted
        headers = {**headers, "WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def parse_json_object(raw: bytes) -> dict:
    """A request body as a strict JSON object, or a 400 that says what is wrong."""
    try:
        return loads_object(raw)
    except InvalidJSON as exc:
        raise APIError(400, str(exc)) from None


def check_body_encoding(request) -> None:
    """A compressed body would be read as broken JSON: say what is wrong instead (415)."""
    encoding = request.headers.get("content-encoding")
    if encoding and encoding.strip().lower() != "identity":
        raise APIError(415, f"Content-Encoding {encoding!r} is not supported: send the request body uncompressed")


async def read_json_object(request) -> dict:
    """The request body as a JSON object, or a 400 (415 when compressed) that says what is wrong."""
    check_body_encoding(request)
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
