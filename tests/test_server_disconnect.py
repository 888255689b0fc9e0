"""A client that goes away aborts its request: the engine stops decoding and frees its pages."""

from __future__ import annotations

import json
import socket
import time

import pytest
from pdserve.tests.support.payloads import generate_body, prompt_ids
from pdserve.tests.support.server_process import ServerProcess
from pdserve.tests.support.waiting import wait_until

HUGE_MAX_TOKENS = 1500  # minutes of CPU decoding: only an abort ends it within the test
ABORT_TIMEOUT_S = 5.0


def _wait_busy(server: ServerProcess, timeout_s: float = 10.0) -> dict:
    """Until a request holds pages and is decoding: the disconnect then hits a live request."""
    def busy_info() -> dict | None:
        info = server.server_info()
        return info if info["num_running_reqs"] > 0 and info["kv_pool"]["used_pages"] > 0 else None

    return wait_until(busy_info, timeout_s, 0.05, lambda: f"the request never started: {server.server_info()}")


def _assert_aborted(server: ServerProcess, generated_before: int) -> None:
    info = server.wait_idle(ABORT_TIMEOUT_S)
    assert info["kv_pool"]["used_pages"] == 0 and info["num_running_reqs"] == 0, info
    # Settled: no further tokens, and fewer than the request asked for (a request
    # that ran to its end makes exactly HUGE_MAX_TOKENS; how many fewer depends on
    # how busy the machine is when the disconnect lands).
    generated = server.server_info()["num_generated_tokens"] - generated_before
    assert generated < HUGE_MAX_TOKENS, generated
    time.sleep(0.3)  # a token generated after the abort has no event to wait for: give it time to show
    assert server.server_info()["num_generated_tokens"] - generated_before == generated


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_client_disconnect_aborts(main_server: ServerProcess, path: str) -> None:
    before = main_server.server_info()["num_generated_tokens"]
    body = {"max_tokens": HUGE_MAX_TOKENS, "ignore_eos": True, "temperature": 0, "stream": True}
    if path == "/v1/completions":
        body["prompt"] = prompt_ids(20, seed=1)
    else:
        body["messages"] = [{"role": "user", "content": "Tell me a long story."}]
    with main_server.client() as client, client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert received
        _wait_busy(main_server)
    _assert_aborted(main_server, before)


def _raw_post(path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_non_streaming_client_disconnect_aborts(main_server: ServerProcess, path: str) -> None:
    before = main_server.server_info()["num_generated_tokens"]
    if path == "/generate":
        body = generate_body(prompt_ids(20, seed=2), HUGE_MAX_TOKENS)
    else:
        body = {"prompt": prompt_ids(20, seed=3), "max_tokens": HUGE_MAX_TOKENS, "ignore_eos": True}
    # A raw socket: the request is surely decoding when the client hangs up.
    with socket.create_connection(("127.0.0.1", main_server.port), timeout=10) as sock:
        sock.sendall(_raw_post(path, body))
        _wait_busy(main_server)
    _assert_aborted(main_server, before)


def test_server_keeps_serving_after_disconnects(main_server: ServerProcess) -> None:
    resp = main_server.post("/generate", generate_body(prompt_ids(20, seed=2), 4))
    assert resp.status_code == 200 and len(resp.json()["output_ids"]) == 4
