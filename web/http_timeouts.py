"""Idle limits on client connections of every pdserve HTTP server (instance, router).

uvicorn closes a kept-alive connection that stays idle between requests
(``timeout_keep_alive``), but not one that opened and sent nothing, nor one
that sent part of a request (headers, some of the body) and then went quiet:
such half-open connections would be held forever. ``read_timeout_protocol``
closes a connection once a request being read gets no byte for
``read_timeout_s``; the application then sees the client leave (``http.disconnect``).
A request that was read in full is never cut: its answer (a long stream
included) may take as long as it needs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("pdserve.http")

DEFAULT_KEEP_ALIVE_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0


class _ReadTimeoutProtocol(HttpToolsProtocol):
    read_timeout_s = DEFAULT_READ_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._reading = True  # a new connection owes its first request
        self._read_timer: asyncio.TimerHandle | None = None
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        self._cancel_read_timer()
        super().data_received(data)
        if self._reading:
            self._arm_read_timer()

    def on_message_begin(self) -> None:
        self._reading = True
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._reading = False
        self._cancel_read_timer()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def _arm_read_timer(self) -> None:
        if not self.transport.is_closing():
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._on_read_timeout)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _on_read_timeout(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            logger.info("closing a connection from %s: no request byte for %.1fs", self.client, self.read_timeout_s)
            self.transport.close()


def read_timeout_protocol(read_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the read limit above."""
    return type("ReadTimeoutProtocol", (_ReadTimeoutProtocol,), {"read_timeout_s": read_timeout_s})


def uvicorn_timeouts(keep_alive_s: float, read_timeout_s: float) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments for both limits."""
    return {"timeout_keep_alive": keep_alive_s, "http": read_timeout_protocol(read_timeout_s)}
