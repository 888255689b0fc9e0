"""A FastAPI route whose endpoint is called with the request, and nothing else.

The generation endpoints read and check their raw bodies themselves
(``server/protocol.py``), so FastAPI's per-request work around them (solving
dependencies, reading a body it does not parse, encoding the result for a
response model) is pure cost: about 23 of 47 us per request in-process, and
several times that on a core that has just woken for the request, where the
first token of a short prompt waits on it. A ``DirectRoute`` keeps the route's
place in ``/openapi.json``, the app's middleware and its exception handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.requests import Request


class DirectRoute(APIRoute):
    """``endpoint(request)`` returns a Response, or content that becomes a JSON one.

    A route with dependencies is refused: they would not run (an auth check
    among them would be skipped without a word).
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        if self.dependant.dependencies:
            raise ValueError(f"DirectRoute {path}: dependencies would not run; check them in the endpoint")

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            result = await endpoint(request)
            return result if isinstance(result, Response) else JSONResponse(result)

        return handler
