"""A real ``pdserve router`` subprocess whose log goes to a file."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from pdserve.tests.support.ports import free_port
from pdserve.tests.support.waiting import wait_until

STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 10.0


@dataclass
class RouterProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(SHUTDOWN_TIMEOUT_S)


@contextmanager
def router_served(flags: list[str] | tuple[str, ...], log_path: Path) -> Iterator[RouterProcess]:
    """``pdserve router FLAGS`` on a free port, healthy, for a ``with`` block."""
    port = free_port()
    argv = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(port), *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    router = RouterProcess(proc, port, log_path)
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"pdserve router exited with {proc.returncode}:\n{router.log_text()[-4000:]}")
            try:
                return httpx.get(router.url + "/health", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, STARTUP_TIMEOUT_S, 0.1, lambda: f"router not healthy:\n{router.log_text()[-4000:]}")
        yield router
    finally:
        router.stop()
