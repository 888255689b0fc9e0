"""Stop work for an HTTP client that went away (instances and router alike)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from pdserve.common.errors import APIError
from starlette.types import Receive

T = TypeVar("T")


async def until_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client leaves first, cancel it and raise a 499.

    The request body is already read, so the next ASGI message is
    ``http.disconnect``: waiting on it wakes us the moment the client leaves,
    where polling ``is_disconnected()`` would keep working for a poll interval.
    Cancelling the work is what aborts it downstream (the engine request, the
    upstream HTTP calls); it is awaited so that cleanup has run on return.
    """
    work_task = await _race(request.receive, work)
    if work_task.cancelled():
        raise APIError(499, "client disconnected")
    return work_task.result()


async def until_disconnected(receive: Receive, work: Awaitable[None]) -> bool:
    """Run ``work`` (a response being streamed); False if the client left first and it was cancelled."""
    work_task = await _race(receive, work)
    if not work_task.cancelled():
        work_task.result()  # re-raise what the work raised
    return not work_task.cancelled()


async def _race(receive: Receive, work: Awaitable[T]) -> asyncio.Future[T]:
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
    return work_task


async def _client_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
