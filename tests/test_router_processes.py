"""`pdserve router --processes N`: several router processes on one port, one
service: connections spread over them, /metrics sums them, a stop signal or a
dead process stops them all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pdserve.router.app import parse_args
from pdserve.tests.support.fake_worker import start_fake
from pdserve.tests.support.health import wait_healthy
from pdserve.tests.support.ports import free_port, is_listening
from pdserve.tests.support.processes import alive, descendants, stop_process
from pdserve.tests.support.waiting import wait_until

PROMPT = {"model": "fake-model", "prompt": "hello", "max_tokens": 4}


@pytest.fixture
def fake_decode():
    worker, thread = start_fake("null", "c0", num_chunks=5)
    yield worker, thread
    thread.stop()


def _start(fake_url: str, tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(port), "--worker", fake_url,
            "--processes", "2", "--health-check-interval-s", "0.2", "--policy", "round_robin", *flags]
    log = open(tmp_path / "router.log", "wb")  # noqa: SIM115 - the process writes it until it stops
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 60.0, proc=proc, describe=lambda: (tmp_path / "router.log").read_text()[-3000:])
    return proc, url


def _answering_pids(url: str, connections: int) -> set[int]:
    pids = set()
    for _ in range(connections):
        with httpx.Client(trust_env=False) as fresh:  # a new connection each time
            pids.add(fresh.get(url + "/get_server_info").json()["pid"])
    return pids


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} missing from /metrics"
    return float(match.group(1))


def test_two_processes_share_the_port_and_sum_their_metrics(fake_decode, tmp_path: Path) -> None:
    _, thread = fake_decode
    proc, url = _start(thread.url, tmp_path)
    try:
        children = descendants(proc.pid)
        assert len(children) >= 2
        pids = _answering_pids(url, 40)
        assert len(pids) == 2 and pids <= children  # both children accept connections
        streamed = 0
        for _ in range(12):
            with httpx.Client(trust_env=False, timeout=10.0) as fresh:
                with fresh.stream("POST", url + "/v1/completions", json={**PROMPT, "stream": True}) as r:
                    assert r.status_code == 200
                    body = b"".join(r.iter_raw())
            assert body.endswith(b"data: [DONE]\n\n")
            streamed += 1
        # Whichever process answers the scrape counts every process's requests.
        for _ in range(4):
            with httpx.Client(trust_env=False) as fresh:
                text = fresh.get(url + "/metrics").text
            assert _metric(text, "pdserve:router_requests_total", 'endpoint="/v1/completions"') == streamed
            assert _metric(text, "pdserve:router_worker_healthy", f'role="null",url="{thread.url}"') == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        # (the spawn context's resource tracker leaves a moment after the parent)
        wait_until(lambda: not any(alive(pid) for pid in children), 10.0, message="every router process stopped")
        assert not is_listening(int(url.rsplit(":", 1)[1]))
    finally:
        stop_process(proc)


def test_a_dead_process_stops_the_router(fake_decode, tmp_path: Path) -> None:
    _, thread = fake_decode
    proc, url = _start(thread.url, tmp_path)
    try:
        victim = min(_answering_pids(url, 40))
        children = descendants(proc.pid)
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(20) == 1
        wait_until(lambda: not any(alive(pid) for pid in children), 10.0, message="every router process stopped")
        assert "exited with code -9; stopping the others" in (tmp_path / "router.log").read_text()
    finally:
        stop_process(proc)


def test_limits_are_shared_among_processes() -> None:
    config = parse_args(["--worker", "http://127.0.0.1:1", "--processes", "3", "--max-concurrent-requests", "10",
                         "--queue-size", "0"])
    assert config.per_process(config.max_concurrent_requests) == 4
    assert config.per_process(config.queue_size) == 0


def test_processes_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--worker", "http://127.0.0.1:1", "--processes", "0"])
    assert exc.value.code == 2
    assert "--processes must be >= 1" in capsys.readouterr().err


def test_a_port_a_stale_router_listens_on_is_refused() -> None:
    """Even a listener with SO_REUSEPORT (another --processes router of this
    user), which the router's own sockets could silently join."""
    with socket.create_server(("127.0.0.1", 0), reuse_port=True) as stale:
        port = stale.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "pdserve.cli", "router", "--port", str(port), "--processes", "2",
                               "--worker", "http://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"port {port}" in done.stderr and "Traceback" not in done.stderr
