"""Stop work for an HTTP client that went away (instances and router alike)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from pdserve.common.errors import APIError

T = TypeVar("T")


async def until_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client leaves first, cancel it and raise a 499.

    The request body is already read, so the next ASGI message is
    ``http.disconnect``: waiting on it wakes us the moment the client leaves,
    where polling ``is_disconnected()`` would keep working for a poll interval.
    Cancelling the work is what aborts it downstream (the engine request, the
    upstream HTTP calls); it is awaited so that cleanup has run on return.
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        raise APIError(499, "client disconnected")
    return work_task.result()


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
