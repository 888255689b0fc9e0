"""A real ``pdserve serve`` subprocess.

:func:`start_server` launches an instance on a free port with the given flags,
waits for ``/health`` to answer 200 and hands back a :class:`ServerProcess`
whose log (stdout and stderr) goes to a file; :func:`served` does the same for
a ``with`` block, and :func:`server_fixture` makes a pytest fixture of it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pdserve.tests.support.health import wait_healthy
from pdserve.tests.support.ports import free_port
from pdserve.tests.support.processes import stop_process
from pdserve.tests.support.waiting import wait_until

STARTUP_TIMEOUT_S = 120.0
IDLE_POLL_S = 0.05
REQUEST_TIMEOUT_S = 60.0


@dataclass
class ServerProcess:
    """One running ``pdserve serve``; ``api_key`` is sent on every helper call."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None
    flags: tuple[str, ...] = field(default_factory=tuple)
    # What /health said while the engine was still starting (None if never seen).
    not_ready_status: int | None = None
    not_ready_body: dict | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout_s)

    def async_client(self, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout_s)

    def post(self, path: str, body: dict, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=timeout_s)

    def get(self, path: str, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=timeout_s)

    def server_info(self) -> dict:
        resp = self.get("/get_server_info")
        resp.raise_for_status()
        return resp.json()

    def wait_idle(self, timeout_s: float = 5.0) -> dict:
        """Poll until no request holds KV pages or runs or waits (aborts are
        asynchronous); return the info then."""
        last: list[dict] = []

        def idle_info() -> dict | None:
            info = self.server_info()
            last[:] = [info]
            busy = info["kv_pool"]["used_pages"] or info["num_running_reqs"] or info["num_queued_reqs"]
            return None if busy else info

        return wait_until(idle_info, timeout_s, IDLE_POLL_S, lambda: f"not idle on {self.flags}: {last[0]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (graceful: the front stops its engine), then SIGKILL the group:
        the engine is a child in the same session and must be gone too."""
        stop_process(self.proc, kill_group=True)


def start_server(
    flags: list[str] | tuple[str, ...], log_path: Path, api_key: str | None = None, timeout_s: float = STARTUP_TIMEOUT_S
) -> ServerProcess:
    """Start ``pdserve serve`` with ``flags`` on a free port and wait until it is healthy."""
    port = free_port()
    argv = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port), *flags]
    if api_key:
        argv += ["--api-key", api_key]
    log = open(log_path, "wb")  # the child inherits the descriptor and keeps writing
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()
    server = ServerProcess(proc, port, log_path, api_key, tuple(flags))
    try:
        _wait_healthy(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def served(flags: list[str] | tuple[str, ...], log_path: Path, api_key: str | None = None) -> Iterator[ServerProcess]:
    """A server for the duration of a ``with`` block (module and session fixtures)."""
    server = start_server(flags, log_path, api_key)
    try:
        yield server
    finally:
        server.stop()


def server_fixture(
    flags: tuple[str, ...], log_name: str, scope: str = "module", api_key: str | None = None
) -> Callable[..., Iterator[ServerProcess]]:
    """A pytest fixture: ``pdserve serve FLAGS`` (with ``--api-key``, when given)
    for ``scope``, its log ``log_name`` under the session's ``server_logs``.

    Assign it to a module-level name ending in ``server``: the name is the
    fixture's, and ``conftest.py`` checks every fixture so named for leaked
    pages after each test.
    """

    @pytest.fixture(scope=scope)
    def fixture(server_logs: Path, model_dir: str) -> Iterator[ServerProcess]:
        # model_dir: the built-in model exists before the server looks for it.
        with served(flags, server_logs / log_name, api_key) as server:
            yield server

    return fixture


def _wait_healthy(server: ServerProcess, timeout_s: float) -> None:
    def note_not_ready(response: httpx.Response) -> None:
        if response.status_code != 200 and server.not_ready_status is None:
            server.not_ready_status, server.not_ready_body = response.status_code, response.json()

    wait_healthy(server.url, timeout_s, proc=server.proc, describe=lambda: server.log_text()[-4000:],
                 on_response=note_not_ready)


def post_concurrently(server: ServerProcess, path: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send every body at once (one connection each) and return responses in order."""
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(lambda body: server.post(path, body), bodies))
