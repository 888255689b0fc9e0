"""How the router and the bootstrap service start: check the port, log, serve.

An instance's front (``server/app.py``) drives its own ``uvicorn.Server``: it
stops the server when its engine dies and waits for the engine before it
reports healthy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from pdserve.common.startup import check_port_free

LOG_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"


class ServiceConfig(Protocol):
    """The flags every service has: where it listens and how much it logs."""

    host: str
    port: int
    log_level: str


def serve_app(config: ServiceConfig, build_app: Callable[[], Any], **uvicorn_args: Any) -> int:
    """Serve the app ``build_app`` returns until shut down; 0 then.

    ``--port`` is checked before anything is built (a StartupError names it) and
    logging is set up before ``build_app`` runs, so what it logs is shown.
    uvicorn logs no line per request (``access_log``); ``uvicorn_args`` adds to
    its settings (``web/http_timeouts.py``'s limits)."""
    import uvicorn

    check_port_free(config.host, config.port, "--port")
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    uvicorn.run(build_app(), host=config.host, port=config.port, log_level=config.log_level, access_log=False,
                **uvicorn_args)
    return 0


def serve_on_socket(config: ServiceConfig, app: Any, sock: Any, **uvicorn_args: Any) -> None:
    """Serve ``app`` on a listening socket made elsewhere (one of several
    processes on one port) until a stop signal."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=config.log_level, access_log=False, **uvicorn_args))
    server.run(sockets=[sock])
