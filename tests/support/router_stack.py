"""A router and fake instances, all in threads of the test process.

:class:`Stack` starts fake prefill, decode and colocated workers
(:mod:`.fake_worker`) and a router in front of them; the ``stack`` fixture of
``tests/conftest.py`` hands one to a test and stops everything after it.
:func:`pd` and :func:`colocated` build the usual set-ups.
"""

from __future__ import annotations

from dataclasses import replace

import httpx
from pdserve.router.app import create_app
from pdserve.router.config import RouterConfig
from pdserve.tests.support.fake_worker import FakeWorker, start_fake
from pdserve.tests.support.server_thread import ServerThread
from pdserve.tests.support.waiting import wait_until

# Health checks every 50 ms: a worker's change of state shows at once.
FAST = RouterConfig(policy="round_robin", health_check_interval_s=0.05,
                    health_check_timeout_s=2.0, request_timeout_s=10.0)
PROMPT = {"model": "fake-model", "prompt": "Hello there", "max_tokens": 4}
ROUTER_START_TIMEOUT_S = 10.0


class Stack:
    """Fake prefill/decode/colocated workers plus a router, all in threads."""

    def __init__(self) -> None:
        self.servers: list[ServerThread] = []
        self.fakes: dict[str, FakeWorker] = {}
        self.urls: dict[str, str] = {}
        self.router: ServerThread | None = None
        # No bound on connections: overload tests send dozens of requests at once.
        self.http = httpx.Client(timeout=10.0, limits=httpx.Limits(max_connections=None))

    @property
    def url(self) -> str:
        """The router's."""
        assert self.router is not None, "no router started"
        return self.router.url

    def fake(self, role: str, name: str, **behavior: object) -> FakeWorker:
        worker, server = start_fake(role, name, **behavior)
        self.servers.append(server)
        self.fakes[name], self.urls[name] = worker, server.url
        return worker

    def start_router(self, config: RouterConfig, wait_healthy: bool = True) -> str:
        self.router = ServerThread(create_app(config)).start()
        self.servers.append(self.router)
        if wait_healthy:
            self.wait_health(200, ROUTER_START_TIMEOUT_S)
        return self.router.url

    def wait_health(self, status: int, timeout_s: float = 5.0) -> None:
        wait_until(lambda: self.get("/health").status_code == status, timeout_s,
                   message=lambda: f"router /health never {status}: {self.get('/workers').json()}")

    def wait_nothing_in_flight(self, timeout_s: float = 5.0) -> None:
        wait_until(lambda: all(w["in_flight"] == 0 for w in self.get("/workers").json()), timeout_s,
                   message=lambda: f"requests still in flight: {self.get('/workers').json()}")

    def get(self, path: str, **kw: object) -> httpx.Response:
        return self.http.get(self.url + path, **kw)

    def post(self, path: str, **kw: object) -> httpx.Response:
        return self.http.post(self.url + path, **kw)

    def close(self) -> None:
        self.http.close()
        for server in self.servers:
            server.request_stop()
        for server in self.servers:
            server.stop()


def pd(stack: Stack, num_prefill: int = 1, num_decode: int = 1, config: RouterConfig = FAST,
       **decode_behavior: object) -> None:
    """Prefill workers ``p0``, ... and decode workers ``d0``, ... (with ``decode_behavior``)
    behind a PD router with ``config``."""
    for i in range(num_prefill):
        stack.fake("prefill", f"p{i}")
    for i in range(num_decode):
        stack.fake("decode", f"d{i}", **decode_behavior)
    stack.start_router(replace(
        config, prefill_urls=tuple(stack.urls[f"p{i}"] for i in range(num_prefill)),
        decode_urls=tuple(stack.urls[f"d{i}"] for i in range(num_decode))))


def colocated(stack: Stack, config: RouterConfig, **behavior: object) -> FakeWorker:
    """One colocated worker ``w0`` (with ``behavior``) behind a router with ``config``."""
    worker = stack.fake("null", "w0", **behavior)
    stack.start_router(replace(config, mode="colocated", worker_urls=(stack.urls["w0"],)))
    return worker
