"""Nothing outlives its parent: a SIGKILLed `pdserve up` takes its whole cluster
along (engines included) and frees its ports; a SIGKILLed front takes its engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pdserve.tests.support.clusters import start_up, up_command
from pdserve.tests.support.payloads import generate_body
from pdserve.tests.support.ports import free_port_block
from pdserve.tests.support.processes import alive, command_line, descendants, parent_pid
from pdserve.tests.support.server_process import start_server
from pdserve.tests.support.waiting import wait_until

SERVE_ARGS = ("--page-size", "4", "--max-total-tokens", "1024", "--skip-server-warmup")
STARTUP_TIMEOUT_S = 240.0
FOLLOW_S = 5.0  # how soon a child must follow its dead parent


def _still_running(pids: set[int]) -> dict[int, str]:
    return {pid: command_line(pid) for pid in pids if alive(pid)}


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sigkill_of_pdserve_up_takes_every_child_along(tmp_path: Path) -> None:
    first = free_port_block(4)
    argv = up_command(first, tmp_path / "logs", STARTUP_TIMEOUT_S, SERVE_ARGS)
    launcher = start_up(argv, tmp_path / "up-1.out", STARTUP_TIMEOUT_S + 30)
    tree = descendants(launcher.pid)
    try:
        children = {pid for pid in tree if parent_pid(pid) == launcher.pid}
        fronts = [pid for pid in children if " serve " in command_line(pid)]
        assert len(children) == 4 and len(fronts) == 2, {p: command_line(p) for p in tree}
        engines = {pid for pid in tree if parent_pid(pid) in fronts and "spawn_main" in command_line(pid)}
        assert len(engines) >= 2, {p: command_line(p) for p in tree}  # one engine per front
        launcher.kill()
        launcher.wait()
        killed_at = time.monotonic()
        wait_until(lambda: not _still_running(tree), FOLLOW_S, 0.05,
                   lambda: f"still running after the launcher's SIGKILL: {_still_running(tree)}")
        print(f"every one of {len(tree)} descendants gone {time.monotonic() - killed_at:.2f} s after the SIGKILL")
        # The ports are free again: the same cluster starts on them and serves.
        again_argv = up_command(first, tmp_path / "logs-again", STARTUP_TIMEOUT_S, SERVE_ARGS)
        again = start_up(again_argv, tmp_path / "up-2.out", STARTUP_TIMEOUT_S + 30)
        tree |= descendants(again.pid)
        body = generate_body([5, 6, 7, 8, 9], 4)
        answer = httpx.post(f"http://127.0.0.1:{first}/generate", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=60) == 0
        # An ordinary stop: no child logs a traceback on its way out.
        logs = {path.name: path.read_text() for path in (tmp_path / "logs-again").iterdir() if path.is_file()}
        assert logs and not any("Traceback" in text for text in logs.values()), logs
    finally:
        if launcher.poll() is None:
            launcher.kill()
        _kill_all(tree)


def test_sigkill_of_a_front_takes_its_engine_along(tmp_path: Path) -> None:
    server = start_server(SERVE_ARGS, tmp_path / "front.log")
    engines = descendants(server.proc.pid)
    try:
        assert any("spawn_main" in command_line(pid) for pid in engines), {p: command_line(p) for p in engines}
        server.proc.kill()
        server.proc.wait()
        wait_until(lambda: not _still_running(engines), FOLLOW_S, 0.05,
                   lambda: f"still running after the front's SIGKILL: {_still_running(engines)}")
    finally:
        _kill_all(engines)
        server.stop()


FRONT_WITH_BUSY_ENGINE = """
import sys, threading, time
from pdserve.common.config import ServerConfig
from pdserve.server.engine_client import EngineClient
from pdserve.tests.support.processes import busy_engine_main
client = EngineClient(ServerConfig(), "", busy_engine_main)
threading.Thread(target=client.start, args=(600,), daemon=True).start()
while client.process.pid is None:
    time.sleep(0.01)
print(client.process.pid, flush=True)
time.sleep(600)
"""


def test_an_engine_that_never_reads_its_pipe_still_follows_its_front() -> None:
    # Pipe EOF alone would leave this engine running: only its lifeline ends it.
    front = subprocess.Popen([sys.executable, "-c", FRONT_WITH_BUSY_ENGINE], stdout=subprocess.PIPE, text=True)
    engine = None
    try:
        engine = int(front.stdout.readline())
        wait_until(lambda: "spawn_main" in command_line(engine) and alive(engine), 30.0, 0.05,
                   "the engine process never started")
        time.sleep(1.0)  # let it get past its imports into the busy loop
        front.kill()
        front.wait()
        wait_until(lambda: not alive(engine), FOLLOW_S, 0.05,
                   lambda: f"engine {engine} still running after its front's SIGKILL")
    finally:
        if front.poll() is None:
            front.kill()
            front.wait()
        if engine is not None:
            _kill_all({engine})


def test_a_signal_to_the_process_group_is_a_stop_not_an_engine_death(tmp_path: Path) -> None:
    """SIGTERM to the whole group (what ``pdserve up`` and supervisors send)
    reaches the engine at the same moment as the front: its exit is part of the
    stop, not a death to report."""
    log = tmp_path / "front.log"
    server = start_server(SERVE_ARGS, log)
    engines = descendants(server.proc.pid)
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=60)
        wait_until(lambda: not _still_running(engines), FOLLOW_S, 0.05,
                   lambda: f"still running after the front stopped: {_still_running(engines)}")
        text = log.read_text()
        assert "engine process died" not in text and "Traceback" not in text, text
        assert server.proc.returncode == -signal.SIGTERM, text  # uvicorn re-raises the signal once stopped
    finally:
        _kill_all(engines)
        server.stop()


def test_sigint_stops_a_front_and_its_engine_without_an_error(tmp_path: Path) -> None:
    """Ctrl-C is an ordinary stop: one line and status 130, the engine gone
    too (it sees the pipe close at once), no death reported, no traceback."""
    log = tmp_path / "front.log"
    server = start_server(SERVE_ARGS, log)
    engines = descendants(server.proc.pid)
    try:
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 130, log.read_text()
        wait_until(lambda: not _still_running(engines), FOLLOW_S, 0.05,
                   lambda: f"still running after the front stopped: {_still_running(engines)}")
        text = log.read_text()
        assert "engine process died" not in text and "Traceback" not in text, text
        assert "front closed the pipe; engine exits" in text and "pdserve serve: stopped" in text, text
    finally:
        _kill_all(engines)
        server.stop()
