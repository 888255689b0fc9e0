"""The router's overload control against fake workers (SGLang gateway semantics).

``--max-concurrent-requests`` generation requests run at once, up to
``--queue-size`` more wait (FIFO) for at most ``--queue-timeout-s``; a full queue
answers 429, an expired wait 408, both with ``Retry-After``; a 503 the router
returns or relays says ``Retry-After`` too.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace

import httpx
import pytest
from pdserve.router.app import create_app
from pdserve.router.config import RouterConfig
from pdserve.tests.support.fake_worker import FakeWorker, start_fake
from pdserve.tests.support.openai_errors import assert_openai_error
from pdserve.tests.support.server_thread import ServerThread
from pdserve.tests.support.waiting import wait_until

BASE = RouterConfig(mode="colocated", policy="round_robin", health_check_interval_s=0.05, health_check_timeout_s=2.0,
                    request_timeout_s=30.0, max_retries=0)
PROMPT = {"model": "fake-model", "prompt": "Hello there", "max_tokens": 4}


class Setup:
    def __init__(self) -> None:
        self.servers: list[ServerThread] = []
        self.url = ""
        self.client = httpx.Client(limits=httpx.Limits(max_connections=None))

    def start(self, config: RouterConfig, **behavior: object) -> FakeWorker:
        worker, server = start_fake("null", "w0", **behavior)
        self.servers.append(server)
        router = ServerThread(create_app(replace(config, worker_urls=(server.url,)))).start()
        self.servers.append(router)
        self.url = router.url
        wait_until(lambda: httpx.get(self.url + "/health").status_code == 200, 10.0)
        return worker

    def post(self, body: dict | None = None, timeout_s: float = 30.0) -> httpx.Response:
        # One shared client: no per-request client set-up that a loaded machine would stretch out.
        return self.client.post(self.url + "/v1/completions", json=body or PROMPT, timeout=timeout_s)

    def nothing_in_flight(self) -> None:
        wait_until(lambda: all(w["in_flight"] == 0 for w in httpx.get(self.url + "/workers").json()), 10.0)

    def close(self) -> None:
        self.client.close()
        for server in self.servers:
            server.request_stop()
        for server in self.servers:
            server.stop()


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = Setup()
    try:
        yield s
    finally:
        s.close()


def _assert_retry_after(resp: httpx.Response, status: int) -> None:
    assert_openai_error(resp, status)
    assert int(resp.headers["Retry-After"]) >= 1, resp.headers


def test_beyond_the_limit_requests_queue_and_beyond_the_queue_get_429(setup: Setup) -> None:
    worker = setup.start(replace(BASE, max_concurrent_requests=2, queue_size=2), delay_s=5.0)
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(setup.post) for _ in range(6)]
        # Two run, two wait; the other two are refused at once, while the first two still run.
        refused = [f.result() for f in itertools.islice(as_completed(futures, timeout=30), 2)]
        for resp in refused:
            _assert_retry_after(resp, 429)
            assert resp.json()["error"]["type"] == "RateLimitError"
        wait_until(lambda: len(worker.requests) >= 2, 10.0)
        time.sleep(0.5)  # time enough for a queued request to slip through, were it let
        assert len(worker.requests) == 2  # the queued two wait while the first two run (5 s)
        statuses = sorted(f.result().status_code for f in futures)
    assert statuses == [200, 200, 200, 200, 429, 429]
    assert len(worker.requests) == 4
    setup.nothing_in_flight()


def test_a_request_that_waits_too_long_gets_408(setup: Setup) -> None:
    setup.start(replace(BASE, max_concurrent_requests=1, queue_size=4, queue_timeout_s=0.5), delay_s=4.0)
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(setup.post)
        wait_until(lambda: httpx.get(setup.url + "/workers").json()[0]["in_flight"] == 1, 10.0)
        start = time.monotonic()
        waited = setup.post()
        _assert_retry_after(waited, 408)
        assert waited.json()["error"]["code"] == "queue_timeout"
        assert time.monotonic() - start < 3.5  # long before the running one is done
        assert running.result().status_code == 200


def test_a_stream_holds_its_slot_until_it_ends(setup: Setup) -> None:
    worker = setup.start(replace(BASE, max_concurrent_requests=1), num_chunks=6, chunk_delay_s=0.3)
    with ThreadPoolExecutor(max_workers=1) as pool:
        with httpx.stream("POST", setup.url + "/v1/completions", json={**PROMPT, "stream": True}, timeout=30) as r:
            chunks = r.iter_raw()
            next(chunks)
            second = pool.submit(setup.post)
            time.sleep(0.5)  # the second request has arrived and waits (nothing to wait on: it must not run)
            assert len(worker.requests) == 1
            rest = b"".join(chunks)
        assert rest.endswith(b"data: [DONE]\n\n")
        assert second.result(timeout=30).status_code == 200
    assert len(worker.requests) == 2


def test_a_client_that_leaves_frees_its_slot(setup: Setup) -> None:
    setup.start(replace(BASE, max_concurrent_requests=1), num_chunks=200, chunk_delay_s=0.1)
    with httpx.stream("POST", setup.url + "/v1/completions", json={**PROMPT, "stream": True}, timeout=30) as r:
        next(r.iter_raw())
    # The 20 s stream was abandoned after its first chunk: the next request runs at once.
    start = time.monotonic()
    resp = setup.post({**PROMPT, "stream": False})
    assert resp.status_code == 200 and time.monotonic() - start < 10.0


def test_a_burst_far_beyond_the_limits_gets_clean_answers(setup: Setup) -> None:
    setup.start(replace(BASE, max_concurrent_requests=2, queue_size=3, queue_timeout_s=1.0), delay_s=0.3)
    with ThreadPoolExecutor(max_workers=40) as pool:
        responses = list(pool.map(lambda _: setup.post(timeout_s=60.0), range(40)))
    by_status: dict[int, int] = {}
    for resp in responses:
        by_status[resp.status_code] = by_status.get(resp.status_code, 0) + 1
        if resp.status_code != 200:
            _assert_retry_after(resp, resp.status_code)
    assert set(by_status) <= {200, 408, 429}, by_status
    assert by_status.get(200, 0) >= 2 and by_status.get(429, 0) >= 1, by_status
    assert httpx.get(setup.url + "/health").status_code == 200
    setup.nothing_in_flight()
    assert setup.post().status_code == 200  # every slot came back


def test_without_a_limit_nothing_queues(setup: Setup) -> None:
    setup.start(BASE, delay_s=0.5)
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert [r.status_code for r in pool.map(lambda _: setup.post(), range(8))] == [200] * 8


def test_503_from_a_worker_or_the_router_says_retry_after(setup: Setup) -> None:
    worker = setup.start(BASE, fail_status=503)
    _assert_retry_after(setup.post(), 503)
    worker.behavior.fail_status = None
    worker.behavior.healthy = False
    wait_until(lambda: httpx.get(setup.url + "/health").status_code == 503, 10.0)
    _assert_retry_after(setup.post(), 503)  # no healthy worker: the router's own 503


def test_a_client_without_the_key_is_refused_not_queued(setup: Setup) -> None:
    """The key is checked before admission: a stranger gets 401 even when the
    queue is full, and never takes a place in it."""
    setup.start(replace(BASE, max_concurrent_requests=1, queue_size=0, api_key="k"), delay_s=3.0)
    keyed = {"Authorization": "Bearer k"}
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(lambda: setup.client.post(setup.url + "/v1/completions", json=PROMPT, headers=keyed,
                                                         timeout=30.0))
        wait_until(lambda: httpx.get(setup.url + "/workers", headers=keyed).json()[0]["in_flight"] == 1, 10.0)
        assert_openai_error(setup.post(), 401)
        _assert_retry_after(setup.client.post(setup.url + "/v1/completions", json=PROMPT, headers=keyed), 429)
        assert running.result().status_code == 200
