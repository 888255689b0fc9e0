"""The router under worker faults, against fake instances: whom it blames, when
it gives up on an attempt, when a worker is down, and how a broken stream ends."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import replace

import httpx
import pytest
from pdserve.common.errors import PREFILL_FAILED_CODE
from pdserve.router.app import create_app, parse_args
from pdserve.router.config import RouterConfig
from pdserve.router.workers import Worker, WorkerRegistry
from pdserve.tests.support.health import wait_healthy
from pdserve.tests.support.ports import closed_within
from pdserve.tests.support.router_stack import FAST, PROMPT, Stack, pd
from pdserve.tests.support.server_thread import ServerThread
from pdserve.tests.support.waiting import wait_until
from pdserve.web.http_timeouts import uvicorn_timeouts

RARE_CHECKS = replace(FAST, health_check_interval_s=60.0)


def _workers(stack: Stack) -> dict[str, dict]:
    return {w["url"]: w for w in stack.get("/workers").json()}


def test_decode_error_naming_the_prefill_retries_another_prefill_on_the_same_decode(stack: Stack) -> None:
    pd(stack, num_prefill=2)
    d = stack.fakes["d0"]
    d.behavior.fail_status, d.behavior.fail_code, d.behavior.num_failures = 502, PREFILL_FAILED_CODE, 1
    response = stack.post("/v1/completions", json=PROMPT)
    assert response.status_code == 200, response.text
    first, second = (b["prefill_instance_id"] for b in d.bodies())
    assert first != second  # the prefill was blamed and avoided; the decode was kept
    # A plain decode failure blames the decode: with one decode there is no other pair.
    d.behavior.fail_code, d.behavior.num_failures = None, 1
    assert stack.post("/v1/completions", json=PROMPT).status_code == 502
    assert len(d.requests) == 3


def test_a_stalled_prefill_fails_over_after_the_first_byte_timeout(stack: Stack) -> None:
    # D answers only after 1.5 s (its part takes that long); p0 hangs and stops answering /health.
    pd(stack, num_prefill=2, delay_s=1.5, config=replace(RARE_CHECKS, first_byte_timeout_s=0.4))
    # round_robin starts with the first prefill of /workers (sorted by URL): that one hangs.
    first_url = next(w["url"] for w in stack.get("/workers").json() if w["role"] == "prefill")
    p0, p1 = sorted((stack.fakes["p0"], stack.fakes["p1"]), key=lambda f: stack.urls[f.name] != first_url)
    p0.behavior.delay_s, p0.behavior.healthy = 60.0, False
    started = time.monotonic()
    response = stack.post("/v1/completions", json=PROMPT, timeout=30)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert elapsed < 10, elapsed  # nowhere near p0's 60 s
    assert stack.fakes["d0"].bodies()[-1]["prefill_instance_id"] == p1.instance_id
    assert p0.cancelled.wait(5.0)  # p0's room was given up
    # p1 and d0 were slower than the timeout too, but both answered /health: waited for, no retry.
    assert len(p1.requests) == 1


def test_a_slow_pair_that_answers_health_is_waited_for(stack: Stack) -> None:
    pd(stack, num_prefill=2, delay_s=1.2, config=replace(RARE_CHECKS, first_byte_timeout_s=0.3))
    assert stack.post("/v1/completions", json=PROMPT, timeout=30).status_code == 200
    assert len(stack.fakes["p0"].requests) + len(stack.fakes["p1"].requests) == 1
    assert all(w["healthy"] for w in _workers(stack).values())


def test_a_busy_prefill_slow_to_answer_health_is_waited_for(stack: Stack) -> None:
    """Slow to the first byte: a prefill whose /health times out but which just
    finished a request is busy, not stalled; the attempt waits for it."""
    pd(stack, config=replace(RARE_CHECKS, first_byte_timeout_s=0.3, health_check_timeout_s=0.3))
    p0, d0 = stack.fakes["p0"], stack.fakes["d0"]
    d0.behavior.delay_s = 1.0  # P answers at once: the router has seen it finish before this call ends
    assert stack.post("/v1/completions", json=PROMPT, timeout=30).status_code == 200
    p0.behavior.delay_s = d0.behavior.delay_s = 0.8  # both slower than the first-byte timeout
    p0.behavior.health_delay_s = 2.0
    response = stack.post("/v1/completions", json=PROMPT, timeout=30)
    assert response.status_code == 200, response.text
    assert len(stack.fakes["p0"].requests) == 2


def test_health_needs_consecutive_failures_and_successes() -> None:
    config = RouterConfig(prefill_urls=("http://p",), decode_urls=("http://d",),
                          health_failure_threshold=3, health_success_threshold=2)
    registry = WorkerRegistry(config, http=None)  # type: ignore[arg-type] - no checks run here
    worker: Worker = registry.all()[1]
    registry.mark_succeeded(worker)
    assert worker.healthy  # a new worker is in on its first success
    for _ in range(2):
        registry.mark_failed(worker, "timeout")
        assert worker.healthy
    registry.mark_succeeded(worker)  # the streak is broken
    registry.mark_failed(worker, "timeout")
    registry.mark_failed(worker, "timeout")
    assert worker.healthy
    registry.mark_failed(worker, "timeout")
    assert not worker.healthy and worker.last_error == "timeout"
    registry.mark_succeeded(worker)
    assert not worker.healthy  # one success does not bring a worker back that was down
    registry.mark_succeeded(worker)
    assert worker.healthy and worker.last_error is None
    registry.mark_failed(worker, "refused", at_once=True)
    assert not worker.healthy


def test_one_failed_health_check_keeps_the_only_prefill(stack: Stack) -> None:
    pd(stack, config=replace(FAST, health_check_interval_s=0.2, health_failure_threshold=3))
    p0 = stack.fakes["p0"]
    p0.behavior.healthy = False
    wait_until(lambda: _workers(stack)[stack.urls["p0"]]["consecutive_failures"] >= 1, 5.0)
    p0.behavior.healthy = True
    assert _workers(stack)[stack.urls["p0"]]["healthy"]
    assert stack.post("/v1/completions", json=PROMPT).status_code == 200
    p0.behavior.healthy = False
    wait_until(lambda: not _workers(stack)[stack.urls["p0"]]["healthy"], 10.0)
    p0.behavior.healthy = True
    stack.wait_health(200)


def test_a_busy_prefill_slow_to_answer_health_stays_in_rotation(stack: Stack) -> None:
    """Its checks time out (a saturated front answers /health late), but it keeps
    finishing requests: not counted. Once it serves nothing, the same timeouts count."""
    pd(stack, config=replace(FAST, health_check_interval_s=0.1, health_check_timeout_s=0.3,
                             health_failure_threshold=2))
    p0, url = stack.fakes["p0"], stack.urls["p0"]
    p0.behavior.health_delay_s = 2.0
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # about six timed-out checks, three times the threshold
        assert stack.post("/v1/completions", json=PROMPT).status_code == 200
    worker = _workers(stack)[url]
    assert worker["healthy"] and worker["consecutive_failures"] == 0
    wait_until(lambda: not _workers(stack)[url]["healthy"], 10.0)
    assert "Timeout" in _workers(stack)[url]["last_error"]


class _DropFirst:
    """A TCP relay in front of a worker that resets the first connection whose
    request starts with ``prefix`` without an answer, like a worker closing an
    idle pooled connection just as it is used."""

    def __init__(self, target_port: int, prefix: bytes) -> None:
        self.target_port = target_port
        self.prefix = prefix
        self.num_dropped = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self._loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(65536)
        if first.startswith(self.prefix) and not self.num_dropped:
            self.num_dropped += 1
            writer.transport.abort()  # a reset, no answer
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        up_writer.write(first)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        async def cancel_relays() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_relays(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_a_keep_alive_race_is_retried_once_and_not_counted(stack: Stack) -> None:
    stack.fake("prefill", "p0")
    d = stack.fake("decode", "d0")
    relay = _DropFirst(int(stack.urls["d0"].rsplit(":", 1)[1]), b"POST")
    try:
        stack.start_router(replace(RARE_CHECKS, prefill_urls=(stack.urls["p0"],), decode_urls=(relay.url,)))
        # The only decode's connection resets: without the retry there would be no pair left.
        response = stack.post("/v1/completions", json=PROMPT)
        assert response.status_code == 200, response.text
        assert relay.num_dropped == 1 and len(d.requests) == 1
        worker = _workers(stack)[relay.url]
        assert worker["healthy"] and worker["consecutive_failures"] == 0
    finally:
        relay.stop()


def test_a_keep_alive_race_in_a_health_check_is_retried_and_not_counted(stack: Stack) -> None:
    stack.fake("prefill", "p0")
    stack.fake("decode", "d0")
    relay = _DropFirst(int(stack.urls["d0"].rsplit(":", 1)[1]), b"GET /health")
    try:
        # Checks are rare: had the reset counted, d0 would not be healthy before the next one in 60 s.
        stack.start_router(replace(RARE_CHECKS, prefill_urls=(stack.urls["p0"],), decode_urls=(relay.url,),
                                   health_failure_threshold=1))
        assert relay.num_dropped == 1
        assert _workers(stack)[relay.url]["consecutive_failures"] == 0
    finally:
        relay.stop()


def test_a_stream_cut_by_the_decode_ends_with_an_error_event_and_done(stack: Stack) -> None:
    pd(stack, num_chunks=4, break_after_chunks=2)
    response = stack.post("/v1/completions", json={**PROMPT, "stream": True})
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "stream broke" in events[-2] and '"type"' in events[-2]


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
                                  b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pr"])
def test_half_open_client_connections_are_closed(sent: bytes) -> None:
    app = create_app(replace(RARE_CHECKS, decode_urls=("http://127.0.0.1:9",), prefill_urls=("http://127.0.0.1:9",)))
    server = ServerThread(app, **uvicorn_timeouts(keep_alive_s=1.0, read_timeout_s=0.5)).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(sent)
            started = time.monotonic()
            assert closed_within(sock, 10.0), "the server kept a half-open connection"
            assert time.monotonic() - started < 5.0
        # An idle kept-alive connection after a full answer is closed too; a full request is answered.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5.0)
            assert sock.recv(4096).startswith(b"HTTP/1.1 503")  # no healthy worker here
            assert closed_within(sock, 10.0)
    finally:
        server.stop()


def test_a_long_answer_is_not_cut_by_the_read_timeout(stack: Stack) -> None:
    stack.fake("prefill", "p0")
    stack.fake("decode", "d0", delay_s=1.5)
    app = create_app(replace(FAST, prefill_urls=(stack.urls["p0"],), decode_urls=(stack.urls["d0"],)))
    server = ServerThread(app, **uvicorn_timeouts(keep_alive_s=1.0, read_timeout_s=0.3)).start()
    stack.servers.append(server)
    wait_healthy(server.url, 10.0)
    assert httpx.post(server.url + "/v1/completions", json=PROMPT, timeout=30).status_code == 200


def test_fault_flags_build_the_config() -> None:
    config = parse_args(["--prefill", "http://p:1", "--decode", "http://d:1", "--first-byte-timeout-s", "2.5",
                         "--health-failure-threshold", "4", "--health-success-threshold", "1",
                         "--http-keep-alive-timeout-s", "3", "--http-read-timeout-s", "7"])
    assert (config.first_byte_timeout_s, config.health_failure_threshold, config.health_success_threshold) == (2.5, 4, 1)
    assert (config.http_keep_alive_timeout_s, config.http_read_timeout_s) == (3.0, 7.0)
    with pytest.raises(SystemExit):
        parse_args(["--health-failure-threshold", "0"])


def _proxy_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pdserve.router.proxy" and r.levelno >= logging.WARNING]


def test_a_clients_mistake_is_relayed_without_a_warning(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A 4xx that a worker answers is the client's, not the worker's fault: the
    client gets it as is, the worker stays healthy, the log stays quiet. A 5xx
    is the worker's, and is logged with its status."""
    pd(stack, fail_status=400)
    with caplog.at_level(logging.DEBUG, logger="pdserve.router.proxy"):
        response = stack.post("/v1/completions", json=PROMPT)
        assert response.status_code == 400 and "failed on purpose" in response.text
        assert _proxy_warnings(caplog) == []
        assert all(w["healthy"] for w in _workers(stack).values())
        stack.fakes["d0"].behavior.fail_status = 500
        assert stack.post("/v1/completions", json=PROMPT).status_code == 500
        warnings = _proxy_warnings(caplog)
    assert warnings and all("decode" in m and ": 500" in m for m in warnings), warnings
