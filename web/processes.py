"""One service served by several processes on one port.

One Python process relays about 40-60k SSE chunks per second on one core:
each chunk costs the event loop a read from upstream and a write to the client,
and those system calls are most of its time. A router in front of several
decode instances relays more than that, so ``pdserve router --processes N``
runs N copies of itself on one port:

- The parent binds N listening sockets to the port with ``SO_REUSEPORT``; the
  kernel spreads new connections among them by their addresses. It then
  starts one child per socket (spawned, not forked: nothing of the parent's
  state is shared) and holds no socket itself.
- A stop signal to the parent stops every child (each shuts down as a single
  server does) and the parent exits 0.
- A child that dies stops the others and the parent exits 1: the service
  fails as a whole, for its supervisor to restart, never half of it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from pdserve.common.startup import StartupError, check_port_free

logger = logging.getLogger("pdserve.web.processes")

STOP_GRACE_S = 15.0  # a child gets this long to finish its streams before it is killed
_POLL_S = 0.2  # how often the parent looks at its stop flag between child events


def reuse_port_sockets(host: str, port: int, count: int, flag: str = "--port") -> list[socket.socket]:
    """``count`` listening sockets on ``host:port`` (port 0: one the system picks,
    the same for all); StartupError naming ``flag`` when the port is taken."""
    # A plain bind first: SO_REUSEPORT alone would join a stale router of the
    # same user still listening there, and share its connections.
    check_port_free(host, port, flag)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.create_server((host, port), family=family, backlog=2048, reuse_port=True))
            port = sockets[0].getsockname()[1]
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise StartupError(f"port {port} on {host} is not free ({exc.strerror or exc}); choose another with {flag}") \
            from None
    return sockets


def run_processes(target: Callable[..., Any], args: tuple, sockets: list[socket.socket], name: str) -> int:
    """Run ``target(*args, index, sock)`` in one spawned child per socket until
    a stop signal (0) or a child's exit (1); every child is gone on return."""
    ctx = mp.get_context("spawn")
    children = [ctx.Process(target=target, args=(*args, i, sock), name=f"{name}-{i}", daemon=False)
                for i, sock in enumerate(sockets)]
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.start()
        for sock in sockets:
            sock.close()  # the children have their own copies
        logger.info("%s: %d processes (pids %s)", name, len(children), ", ".join(str(c.pid) for c in children))
        return _supervise(children, stop, name)
    finally:
        _stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(children: list, stop: threading.Event, name: str) -> int:
    by_sentinel = {c.sentinel: c for c in children}
    while not stop.is_set():
        ready = wait(list(by_sentinel), timeout=_POLL_S)
        if not ready:
            continue
        if stop.is_set():
            break  # a child that saw the same signal first
        for sentinel in ready:
            child = by_sentinel[sentinel]
            child.join(1.0)  # its pipes close a moment before its exit status is there
            logger.error("%s: process %s (pid %s) exited with code %s; stopping the others",
                         name, child.name, child.pid, child.exitcode)
        return 1
    return 0


def _stop_all(children: list) -> None:
    for child in children:
        if child.is_alive():
            child.terminate()  # SIGTERM: the child's server drains as on its own
    for child in children:
        child.join(STOP_GRACE_S)
        if child.is_alive():
            logger.warning("%s (pid %s) did not stop within %.0f s; killing it", child.name, child.pid, STOP_GRACE_S)
            child.kill()
            child.join()
