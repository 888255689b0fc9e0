"""The router's overload control against fake workers (SGLang gateway semantics).

``--max-concurrent-requests`` generation requests run at once, up to
``--queue-size`` more wait (FIFO) for at most ``--queue-timeout-s``; a full queue
answers 429, an expired wait 408, both with ``Retry-After``; a 503 the router
returns or relays says ``Retry-After`` too.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace

import httpx
from pdserve.tests.support.openai_errors import assert_openai_error
from pdserve.tests.support.router_stack import FAST, PROMPT, Stack, colocated
from pdserve.tests.support.waiting import wait_until

BASE = replace(FAST, request_timeout_s=30.0, max_retries=0)


def _complete(stack: Stack, body: dict | None = None, timeout_s: float = 30.0) -> httpx.Response:
    # The stack's one client: no per-request client set-up that a loaded machine would stretch out.
    return stack.post("/v1/completions", json=body or PROMPT, timeout=timeout_s)


def _assert_retry_after(resp: httpx.Response, status: int) -> None:
    assert_openai_error(resp, status)
    assert int(resp.headers["Retry-After"]) >= 1, resp.headers


def test_beyond_the_limit_requests_queue_and_beyond_the_queue_get_429(stack: Stack) -> None:
    worker = colocated(stack, replace(BASE, max_concurrent_requests=2, queue_size=2), delay_s=5.0)
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(_complete, stack) for _ in range(6)]
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
    stack.wait_nothing_in_flight(10.0)


def test_a_request_that_waits_too_long_gets_408(stack: Stack) -> None:
    colocated(stack, replace(BASE, max_concurrent_requests=1, queue_size=4, queue_timeout_s=0.5), delay_s=4.0)
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(_complete, stack)
        wait_until(lambda: stack.get("/workers").json()[0]["in_flight"] == 1, 10.0)
        start = time.monotonic()
        waited = _complete(stack)
        _assert_retry_after(waited, 408)
        assert waited.json()["error"]["code"] == "queue_timeout"
        assert time.monotonic() - start < 3.5  # long before the running one is done
        assert running.result().status_code == 200


def test_a_stream_holds_its_slot_until_it_ends(stack: Stack) -> None:
    worker = colocated(stack, replace(BASE, max_concurrent_requests=1), num_chunks=6, chunk_delay_s=0.3)
    with ThreadPoolExecutor(max_workers=1) as pool:
        with httpx.stream("POST", stack.url + "/v1/completions", json={**PROMPT, "stream": True}, timeout=30) as r:
            chunks = r.iter_raw()
            next(chunks)
            second = pool.submit(_complete, stack)
            time.sleep(0.5)  # the second request has arrived and waits (nothing to wait on: it must not run)
            assert len(worker.requests) == 1
            rest = b"".join(chunks)
        assert rest.endswith(b"data: [DONE]\n\n")
        assert second.result(timeout=30).status_code == 200
    assert len(worker.requests) == 2


def test_a_client_that_leaves_frees_its_slot(stack: Stack) -> None:
    colocated(stack, replace(BASE, max_concurrent_requests=1), num_chunks=200, chunk_delay_s=0.1)
    with httpx.stream("POST", stack.url + "/v1/completions", json={**PROMPT, "stream": True}, timeout=30) as r:
        next(r.iter_raw())
    # The 20 s stream was abandoned after its first chunk: the next request runs at once.
    start = time.monotonic()
    resp = _complete(stack, {**PROMPT, "stream": False})
    assert resp.status_code == 200 and time.monotonic() - start < 10.0


def test_a_burst_far_beyond_the_limits_gets_clean_answers(stack: Stack) -> None:
    colocated(stack, replace(BASE, max_concurrent_requests=2, queue_size=3, queue_timeout_s=1.0), delay_s=0.3)
    with ThreadPoolExecutor(max_workers=40) as pool:
        responses = list(pool.map(lambda _: _complete(stack, timeout_s=60.0), range(40)))
    by_status: dict[int, int] = {}
    for resp in responses:
        by_status[resp.status_code] = by_status.get(resp.status_code, 0) + 1
        if resp.status_code != 200:
            _assert_retry_after(resp, resp.status_code)
    assert set(by_status) <= {200, 408, 429}, by_status
    assert by_status.get(200, 0) >= 2 and by_status.get(429, 0) >= 1, by_status
    assert stack.get("/health").status_code == 200
    stack.wait_nothing_in_flight(10.0)
    assert _complete(stack).status_code == 200  # every slot came back


def test_without_a_limit_nothing_queues(stack: Stack) -> None:
    colocated(stack, BASE, delay_s=0.5)
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert [r.status_code for r in pool.map(lambda _: _complete(stack), range(8))] == [200] * 8


def test_503_from_a_worker_or_the_router_says_retry_after(stack: Stack) -> None:
    worker = colocated(stack, BASE, fail_status=503)
    _assert_retry_after(_complete(stack), 503)
    worker.behavior.fail_status = None
    worker.behavior.healthy = False
    wait_until(lambda: stack.get("/health").status_code == 503, 10.0)
    _assert_retry_after(_complete(stack), 503)  # no healthy worker: the router's own 503


def test_a_client_without_the_key_is_refused_not_queued(stack: Stack) -> None:
    """The key is checked before admission: a stranger gets 401 even when the
    queue is full, and never takes a place in it."""
    colocated(stack, replace(BASE, max_concurrent_requests=1, queue_size=0, api_key="k"), delay_s=3.0)
    keyed = {"Authorization": "Bearer k"}
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(lambda: stack.post("/v1/completions", json=PROMPT, headers=keyed, timeout=30.0))
        wait_until(lambda: stack.get("/workers", headers=keyed).json()[0]["in_flight"] == 1, 10.0)
        assert_openai_error(_complete(stack), 401)
        _assert_retry_after(stack.post("/v1/completions", json=PROMPT, headers=keyed), 429)
        assert running.result().status_code == 200
