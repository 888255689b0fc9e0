"""The processes a serving benchmark starts: ports, children, health waits, signals.

Every child runs in its own session, so that one signal to its process group
stops everything it spawned; every wait is bounded and fails fast, with the
child's log tail, when the child exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

STOP_GRACE_S = 10.0
POLL_INTERVAL_S = 0.25
LOG_TAIL_LINES = 30


def log(message: str) -> None:
    """One progress line on stderr, named after the running benchmark."""
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "serving"
    print(f"[{name}] {message}", file=sys.stderr, flush=True)


class CostError(RuntimeError):
    """The benchmark cannot go on: a process did not start or a run failed."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def python_module(module: str, *args: str) -> list[str]:
    """The command line of ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@dataclass
class Child:
    """A started process, with the log its output goes to."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])

    def check_alive(self) -> None:
        """Raises ``CostError`` with the log tail when the child has exited."""
        if self.proc.poll() is not None:
            raise CostError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")


def start_child(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
    """A child in its own session (so one signal reaches all it spawns), output to ``log_dir/name.log``."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    log(f"started {name} (pid {proc.pid}): {' '.join(argv)}")
    return Child(name, proc, log_path)


def stop_child(child: Child, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the child's process group, SIGKILL after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, sig)
        try:
            child.proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.proc.pid, signal.SIGKILL)  # leftovers of the group


@contextlib.contextmanager
def running(name: str, argv: list[str], log_dir: Path, grace_s: float = STOP_GRACE_S) -> Iterator[Child]:
    """A child for the length of the block, stopped on the way out whatever happens."""
    child = start_child(name, argv, log_dir)
    try:
        yield child
    finally:
        stop_child(child, grace_s)
        log(f"stopped {name}")


def http_get_status(url: str, timeout_s: float = 2.0) -> int | None:
    """The HTTP status of ``GET url``; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def http_get_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_for(child: Child, ready: Callable[[], bool], timeout_s: float, what: str,
             poll_s: float = POLL_INTERVAL_S) -> None:
    """Until ``ready()``; fails fast when the child exits, and after ``timeout_s`` saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        child.check_alive()
        if ready():
            return
        time.sleep(poll_s)
    raise CostError(f"{child.name}: {what} within {timeout_s:g} s:\n{child.log_tail()}")


def wait_healthy(child: Child, url: str, timeout_s: float, poll_s: float = POLL_INTERVAL_S) -> None:
    """Until ``GET url`` answers 200; fails fast when the child exits."""
    wait_for(child, lambda: http_get_status(url) == 200, timeout_s, f"{url} not 200", poll_s)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM unwind as KeyboardInterrupt, so every ``finally`` stops its
    children; SIGINT too, since a shell starts background jobs with it ignored."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_guarded(measure: Callable[[], T]) -> tuple[T | None, int]:
    """``measure()`` with SIGINT/SIGTERM unwinding through every ``finally`` that stops a child.

    Returns its result and exit status 0; on a ``CostError`` (logged) None and 1,
    on an interrupt None and 130.
    """
    try:
        with interrupt_on_signals():
            return measure(), 0
    except CostError as exc:
        log(f"error: {exc}")
        return None, 1
    except KeyboardInterrupt:
        log("interrupted; children stopped")
        return None, 130
