"""``/health`` of a service under test: is it up, and waiting until it is.

Every pdserve HTTP service (instance, router, bootstrap service, the benchmark
fakes) answers ``GET /health`` with 200 once it serves. Requests ignore proxy
settings from the environment: everything under test listens on this machine.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import httpx
from pdserve.tests.support.waiting import wait_until

HEALTH_TIMEOUT_S = 5.0  # for one GET /health
HEALTH_POLL_S = 0.1


def health_response(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> httpx.Response | None:
    """``GET url/health``; None when nothing answers (not listening yet, gone, timed out)."""
    try:
        return httpx.get(url.rstrip("/") + "/health", timeout=timeout_s, trust_env=False)
    except httpx.HTTPError:
        return None


def is_healthy(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """``GET url/health`` answers 200."""
    response = health_response(url, timeout_s)
    return response is not None and response.status_code == 200


def wait_healthy(
    url: str,
    timeout_s: float,
    *,
    proc: subprocess.Popen | None = None,
    describe: Callable[[], str] = lambda: "",
    on_response: Callable[[httpx.Response], None] | None = None,
    interval_s: float = HEALTH_POLL_S,
) -> None:
    """Poll ``url/health`` until it answers 200.

    ``proc``, when given, is the process that serves ``url``: its exit ends the
    wait at once with :class:`RuntimeError`. ``describe`` adds to either error
    (a log tail, say); ``on_response`` sees every answer that came (a test that
    checks what ``/health`` says while the service starts).
    """

    def healthy() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with {proc.returncode}:\n{describe()}")
        response = health_response(url)
        if response is None:
            return False
        if on_response is not None:
            on_response(response)
        return response.status_code == 200

    wait_until(healthy, timeout_s, interval_s, lambda: f"{url} not healthy:\n{describe()}")
