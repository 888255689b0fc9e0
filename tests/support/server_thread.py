"""An ASGI app served by uvicorn in a daemon thread of the test process."""

from __future__ import annotations

import socket
import threading
from typing import Any

import uvicorn
from pdserve.tests.support.waiting import wait_until


def _bind(host: str, port: int) -> socket.socket:
    """A bound socket; port 0 picks a free one. SO_REUSEADDR lets a restarted
    server take the port of one that just stopped."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class ServerThread:
    """Serve ``app`` on ``host`` and ``port`` (0: a free one); ``uvicorn_options``
    go to :class:`uvicorn.Config` (``timeout_keep_alive``, say)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **uvicorn_options: Any) -> None:
        self._sock = _bind(host, port)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        options = {"log_level": "warning", "lifespan": "on", "timeout_graceful_shutdown": 1, **uvicorn_options}
        self._server = uvicorn.Server(uvicorn.Config(app, **options))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True)

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        self._thread.start()
        wait_until(lambda: self._server.started or not self._thread.is_alive(), timeout_s, 0.01,
                   f"server on {self.url} did not start")
        if not self._server.started:
            raise RuntimeError(f"server on {self.url} exited while starting")
        return self

    def num_connections(self) -> int:
        """Client connections open now, idle kept-alive ones included."""
        return len(self._server.server_state.connections)

    def request_stop(self) -> None:
        """Ask the server to exit without waiting (stop many servers at once)."""
        self._server.should_exit = True

    def stop(self, timeout_s: float = 5.0) -> None:
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
