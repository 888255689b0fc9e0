"""A real ``pdserve router`` subprocess whose log goes to a file."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pdserve.tests.support.health import wait_healthy
from pdserve.tests.support.ports import free_port
from pdserve.tests.support.processes import stop_process

STARTUP_TIMEOUT_S = 60.0


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
        stop_process(self.proc)


@contextmanager
def router_served(flags: list[str] | tuple[str, ...], log_path: Path) -> Iterator[RouterProcess]:
    """``pdserve router FLAGS`` on a free port, healthy, for a ``with`` block."""
    port = free_port()
    argv = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(port), *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    router = RouterProcess(proc, port, log_path)
    try:
        wait_healthy(router.url, STARTUP_TIMEOUT_S, proc=proc, describe=lambda: router.log_text()[-4000:])
        yield router
    finally:
        router.stop()
