"""Hostile input against a real instance and a real router in front of it.

Every malformed request of a broad matrix (JSON shape, types, ranges, non-finite
numbers, invalid Unicode, sizes) on every endpoint gets an OpenAI error with a
4xx, never a 5xx, and neither process logs a traceback. Oversized bodies get a
413 before they are read; a prompt of megabytes tokenizes off the event loop, so
``/health`` keeps answering meanwhile; an instance's queue-full 503 says
``Retry-After``, also through the router.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pdserve.tests.support.openai_errors import assert_openai_error
from pdserve.tests.support.payloads import generate_body, prompt_ids
from pdserve.tests.support.router_process import RouterProcess, router_served
from pdserve.tests.support.server_process import ServerProcess, server_fixture
from pdserve.tests.support.waiting import wait_until

MAX_REQUEST_BYTES = 8_000_000
FLAGS = ("--page-size", "4", "--max-total-tokens", "4096", "--max-running-requests", "1",
         "--max-queued-requests", "1", "--max-request-bytes", str(MAX_REQUEST_BYTES))
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate")
HEALTH_BOUND_S = 1.0


hostile_server = server_fixture(FLAGS, "hostile.log")


@pytest.fixture(scope="module")
def router(hostile_server: ServerProcess, server_logs: Path) -> Iterator[RouterProcess]:
    flags = ["--worker", hostile_server.url, "--max-request-bytes", str(MAX_REQUEST_BYTES),
             "--health-check-interval-s", "0.5", "--max-retries", "0"]
    with router_served(flags, server_logs / "hostile-router.log") as process:
        yield process


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes
    status: int = 400


def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
GENERATE = {"text": "hello", "sampling_params": {"max_new_tokens": 2}}
VALID = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT, "/generate": GENERATE}


def _shape_cases(path: str) -> list[Case]:
    """Bodies that are not a usable JSON object, on any generation path."""
    deep = b"[" * 100_000 + b"]" * 100_000
    nested = b"[" * 100 + b"]" * 100
    good = json.dumps(VALID[path])[:-1].encode()  # the valid body, open for one more field
    return [
        Case("empty body", path, b""),
        Case("whitespace body", path, b"  \n "),
        Case("truncated JSON", path, good),
        Case("array body", path, b"[1, 2]"),
        Case("string body", path, b'"prompt"'),
        Case("number body", path, b"42"),
        Case("null body", path, b"null"),
        Case("deeply nested JSON", path, good + b', "x": ' + deep + b"}"),
        Case("nested beyond the depth limit", path, good + b', "x": ' + nested + b"}"),
        Case("NaN literal", path, good + b', "temperature": NaN}'),
        Case("Infinity literal", path, good + b', "top_p": Infinity}'),
        Case("-Infinity literal", path, good + b', "min_p": -Infinity}'),
        Case("float overflowing to infinity", path, good + b', "temperature": 1e999}'),
        Case("integer of 5000 digits", path, good + b', "seed": 1' + b"0" * 5000 + b"}"),
        Case("invalid UTF-8 bytes", path, good + b', "stop": "\xff\xfe\xc3"}'),
        Case("lone surrogate in stop", path, good + b', "stop": "\\ud800"}'),
        Case("lone low surrogate in model", path, json.dumps({**VALID[path], "model": "x"}).encode()
             .replace(b'"x"', b'"\\udc00"')),
        Case("unknown model", path, _j({**VALID[path], "model": "gpt-17"}), 404),
    ]


def _field_cases() -> list[Case]:
    """Wrong types and ranges, one field at a time."""
    c, ch, g = "/v1/completions", "/v1/chat/completions", "/generate"
    user = {"role": "user", "content": "hi"}
    cases = [
        (c, {"model": "tiny"}), (c, {**COMPLETION, "prompt": {}}), (c, {**COMPLETION, "prompt": None}),
        (c, {**COMPLETION, "prompt": [1, "a"]}), (c, {**COMPLETION, "prompt": [[]]}), (c, {**COMPLETION, "prompt": []}),
        (c, {**COMPLETION, "prompt": "\ud800"}), (c, {**COMPLETION, "prompt": [10**30]}), (c, {**COMPLETION, "prompt": [-1]}),
        (c, {**COMPLETION, "max_tokens": "2"}), (c, {**COMPLETION, "max_tokens": 2.5}), (c, {**COMPLETION, "max_tokens": True}),
        (c, {**COMPLETION, "max_tokens": 10**400}), (c, {**COMPLETION, "max_tokens": -(10**30)}),
        (c, {**COMPLETION, "temperature": 10**400}), (c, {**COMPLETION, "temperature": -1}), (c, {**COMPLETION, "temperature": "hot"}),
        (c, {**COMPLETION, "top_p": 0}), (c, {**COMPLETION, "top_p": 2}), (c, {**COMPLETION, "top_k": 0}), (c, {**COMPLETION, "top_k": 1.5}),
        (c, {**COMPLETION, "min_p": -1}), (c, {**COMPLETION, "presence_penalty": 3}), (c, {**COMPLETION, "frequency_penalty": -10**400}),
        (c, {**COMPLETION, "repetition_penalty": 0}), (c, {**COMPLETION, "n": 0}), (c, {**COMPLETION, "n": 17}), (c, {**COMPLETION, "n": "2"}),
        (c, {**COMPLETION, "n": 10**30}), (c, {**COMPLETION, "stream": "yes"}), (c, {**COMPLETION, "stream_options": "x"}),
        (c, {**COMPLETION, "stop": [1]}), (c, {**COMPLETION, "stop": {"a": 1}}), (c, {**COMPLETION, "stop": ["x"] * 17}),
        (c, {**COMPLETION, "logprobs": True}), (c, {**COMPLETION, "logprobs": 100}), (c, {**COMPLETION, "seed": "x"}),
        (c, {**COMPLETION, "seed": 2**64}), (c, {**COMPLETION, "model": 5}), (c, {**COMPLETION, "echo": True}),
        (c, {**COMPLETION, "bootstrap_room": -1}), (c, {**COMPLETION, "bootstrap_room": 2**63}), (c, {**COMPLETION, "bootstrap_room": "x"}),
        (c, {**COMPLETION, "stop_token_ids": "x"}), (c, {**COMPLETION, "stop_token_ids": [10**30]}),
        (ch, {"model": "tiny"}), (ch, {**CHAT, "messages": "hi"}), (ch, {**CHAT, "messages": []}), (ch, {**CHAT, "messages": [1]}),
        (ch, {**CHAT, "messages": [[user]]}), (ch, {**CHAT, "messages": [{"content": "hi"}]}),
        (ch, {**CHAT, "messages": [{"role": ["user"], "content": "hi"}]}), (ch, {**CHAT, "messages": [{"role": None, "content": "hi"}]}),
        (ch, {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}),
        (ch, {**CHAT, "messages": [{"role": "user", "content": {"a": 1}}]}), (ch, {**CHAT, "messages": [{"role": "user", "content": 5}]}),
        (ch, {**CHAT, "messages": [{"role": "user", "content": None}]}),
        (ch, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
        (ch, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": [[["deep"]]]}]}]}),
        (ch, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": {"a": "b"}}]}]}),
        (ch, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
        (ch, {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        (ch, {**CHAT, "messages": [{"role": "user", "content": [1, 2]}]}), (ch, {**CHAT, "messages": [{"role": "user", "content": ["hi"]}]}),
        (ch, {**CHAT, "messages": [{"role": "user", "content": "\udfff"}]}), (ch, {**CHAT, "logprobs": "yes"}),
        (ch, {**CHAT, "logprobs": True, "top_logprobs": 21}), (ch, {**CHAT, "max_completion_tokens": 0}),
        (ch, {**CHAT, "tools": [{"type": "function"}]}), (ch, {**CHAT, "temperature": [1]}),
        (g, {}), (g, {"text": "hi", "input_ids": [1]}), (g, {"input_ids": "hello"}), (g, {"input_ids": ["a"]}),
        (g, {"input_ids": {}}), (g, {"input_ids": []}), (g, {"input_ids": [[1], "x"]}), (g, {"input_ids": 5}),
        (g, {"text": 5}), (g, {"text": ["a", 1]}), (g, {"text": {"a": 1}}), (g, {"text": ""}), (g, {"text": "\ud800x"}),
        (g, {**GENERATE, "sampling_params": "x"}), (g, {**GENERATE, "sampling_params": [1]}),
        (g, {**GENERATE, "sampling_params": {"max_new_tokens": -1}}), (g, {**GENERATE, "sampling_params": {"temperature": "x"}}),
        (g, {**GENERATE, "sampling_params": {"sampling_seed": "x"}}), (g, {**GENERATE, "sampling_params": {"sampling_seed": 2**70}}),
        (g, {**GENERATE, "sampling_params": {"stop_token_ids": "x"}}), (g, {**GENERATE, "sampling_params": {"top_p": 10**400}}),
        (g, {**GENERATE, "return_logprob": "yes"}), (g, {**GENERATE, "return_logprob": True, "top_logprobs_num": 100}),
        (g, {**GENERATE, "stream": 1}),
    ]
    # json.dumps writes a lone surrogate as its escape: the body is valid JSON with invalid text.
    return [Case(f"{path} {json.dumps(body)[:80]}", path, _j(body)) for path, body in cases]


def matrix() -> list[Case]:
    return [case for path in GENERATE_PATHS for case in _shape_cases(path)] + _field_cases()


# Other endpoints: garbage bodies, queries, methods and paths get no 5xx.
OTHER_REQUESTS = [
    ("GET", "/health?x=%ff", b"garbage"), ("GET", "/v1/models?limit=-1", b"[[["), ("GET", "/v1/models/%ff%fe", b""),
    ("GET", "/v1/models/" + "a" * 5000, b""), ("POST", "/v1/models", b"{}"), ("GET", "/get_model_info", b"\xff"),
    ("GET", "/get_server_info?verbose=NaN", b"{"), ("POST", "/flush_cache", b"\xff\xfe"), ("GET", "/metrics?x=1", b"null"),
    ("DELETE", "/v1/completions", b""), ("GET", "/generate", b""), ("PUT", "/v1/chat/completions", b"{}"),
    ("POST", "/no/such/path", b"{}"), ("GET", "/workers", b"[]"), ("GET", "/health_generate", b"{}"),
]


def _send(url: str, case: Case) -> httpx.Response:
    return httpx.post(url + case.path, content=case.body, headers={"Content-Type": "application/json"}, timeout=60.0)


def _failures(url: str) -> list[str]:
    failures = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        cases = matrix()
        for case, resp in zip(cases, pool.map(lambda c: _send(url, c), cases)):
            try:
                assert_openai_error(resp, case.status)
            except (AssertionError, ValueError) as exc:
                failures.append(f"{case.name}: {resp.status_code} {resp.text[:200]} ({exc})"[:400])
    for method, path, body in OTHER_REQUESTS:
        resp = httpx.request(method, url + path, content=body, timeout=60.0)
        if resp.status_code >= 500 or (resp.status_code >= 400 and "error" not in resp.json()):
            failures.append(f"{method} {path}: {resp.status_code} {resp.text[:200]}")
    return failures


def _assert_no_traceback(log: str, who: str) -> None:
    assert "Traceback" not in log, f"{who} logged a traceback:\n{log[-6000:]}"


def test_malformed_input_matrix_on_the_instance(hostile_server: ServerProcess) -> None:
    failures = _failures(hostile_server.url)
    assert not failures, "\n".join(failures)
    assert hostile_server.alive()
    _assert_no_traceback(hostile_server.log_text(), "the instance")


def test_malformed_input_matrix_through_the_router(hostile_server: ServerProcess, router: RouterProcess) -> None:
    failures = _failures(router.url)
    assert not failures, "\n".join(failures)
    assert router.proc.poll() is None
    _assert_no_traceback(router.log_text(), "the router")
    _assert_no_traceback(hostile_server.log_text(), "the instance")


def test_valid_requests_still_pass(hostile_server: ServerProcess, router: RouterProcess) -> None:
    """The matrix's base bodies (and a surrogate pair, which is one valid character) are served."""
    for url in (hostile_server.url, router.url):
        for path, body in VALID.items():
            resp = httpx.post(url + path, json=body, timeout=60.0)
            assert resp.status_code == 200, resp.text
        pair = _j({**COMPLETION, "prompt": "smile \U0001F600"})
        assert b"\\ud83d\\ude00" in pair
        resp = httpx.post(url + "/v1/completions", content=pair, timeout=60.0)
        assert resp.status_code == 200, resp.text


# ---- sizes ------------------------------------------------------------------------
def _raw_exchange(port: int, head: bytes, timeout_s: float = 10.0) -> bytes:
    """Send ``head`` (request line and headers, maybe a body start) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


@pytest.mark.parametrize("target", ["instance", "router"])
def test_declared_oversized_body_is_refused_before_it_is_sent(target: str, hostile_server: ServerProcess,
                                                              router: RouterProcess) -> None:
    """A Content-Length over the limit gets its 413 at once: no byte of the body is ever sent."""
    port = hostile_server.port if target == "instance" else router.port
    for path in GENERATE_PATHS:
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {10**12}\r\n\r\n").encode()
        start = time.monotonic()
        answer = _raw_exchange(port, head)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
        assert time.monotonic() - start < 5.0
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert_openai_error(body, 413, code="request_too_large")


@pytest.mark.parametrize("target", ["instance", "router"])
def test_chunked_oversized_body_is_cut_off(target: str, hostile_server: ServerProcess, router: RouterProcess) -> None:
    """A chunked body (no Content-Length) is refused once it passes the limit."""
    url = hostile_server.url if target == "instance" else router.url
    sent = [0]

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        while sent[0] < 4 * MAX_REQUEST_BYTES:
            sent[0] += 1 << 20
            yield b"a" * (1 << 20)
        yield b'"}'

    try:
        resp = httpx.post(url + "/v1/completions", content=chunks(), timeout=60.0)
    except httpx.TransportError:
        resp = None  # the server answered and closed while the client was still writing
    # It stopped reading soon after the limit (what socket buffers took, at most), not at the end.
    assert sent[0] < 3 * MAX_REQUEST_BYTES, sent[0]
    if resp is not None:
        assert_openai_error(resp, 413, code="request_too_large")
        assert resp.headers["connection"] == "close"


# ---- CPU work off the event loop ---------------------------------------------------
SENTENCE = "The quick brown fox jumps over the lazy dog. "


def test_health_answers_while_megabytes_of_prompts_tokenize(hostile_server: ServerProcess) -> None:
    """1200 prompts of ~1800 tokens each (5 MB, seconds of tokenizing), the last too long
    for the context: /health and /v1/models answer promptly all along."""
    prompts = [SENTENCE * 90] * 1200 + [SENTENCE * 400]
    raw = _j({"prompt": prompts, "max_tokens": 2})  # encoded here, not while the probes run
    result: list[httpx.Response] = []
    big = threading.Thread(target=lambda: result.append(
        httpx.post(hostile_server.url + "/v1/completions", content=raw, timeout=300.0)))
    probes: list[float] = []
    with httpx.Client(base_url=hostile_server.url, timeout=10.0) as client:
        client.get("/health")  # connected before the big request starts
        big.start()
        began = time.monotonic()
        while big.is_alive():
            start = time.monotonic()
            assert client.get("/health").status_code == 200
            health_s = time.monotonic() - start
            assert client.get("/v1/models").status_code == 200
            probes.append((time.monotonic() - start, health_s, start - began))
            time.sleep(0.05)
    big.join()
    assert len(probes) >= 5, f"the big request ended too soon to tell ({len(probes)} probes)"
    slowest = sorted(probes)[-3:]
    assert max(probes)[0] < HEALTH_BOUND_S, f"slowest probes (pair s, /health s, at s): {slowest}, of {len(probes)}"
    assert_openai_error(result[0], 400, param="prompt", code="context_length_exceeded")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing(path: str, hostile_server: ServerProcess) -> None:
    text = SENTENCE * 150_000  # 6.75 MB: seconds to tokenize, refused in far less
    body = {"prompt": text} if path == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    start = time.monotonic()
    resp = hostile_server.post(path, {**body, "max_tokens": 2})
    assert_openai_error(resp, 400, code="context_length_exceeded")
    assert time.monotonic() - start < 5.0


def test_auto_truncation_of_a_huge_prompt_keeps_its_head(small_server: ServerProcess, model_dir: str) -> None:
    """Cut before tokenizing, the prompt still gives the head tokens the whole text would."""
    from pdserve.server.tokenizer import load_tokenizer

    text = "".join(f"{SENTENCE}{i} " for i in range(20_000))  # ~1 MB, far beyond 64 tokens
    resp = small_server.post("/generate", {"text": text, "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert resp.status_code == 200, resp.text
    head = load_tokenizer(model_dir).encode(text)[: 64 - 8]
    same = small_server.post("/generate", {"input_ids": head, "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert resp.json()["output_ids"] == same.json()["output_ids"]
    assert resp.json()["meta_info"]["prompt_tokens"] == len(head)


# ---- overload -----------------------------------------------------------------------
def test_queue_full_503_says_retry_after_on_the_instance_and_through_the_router(
        hostile_server: ServerProcess, router: RouterProcess) -> None:
    long_body = {**generate_body(prompt_ids(8, seed=0), 1500), "stream": True}
    with hostile_server.client() as client, client.stream("POST", "/generate", json=long_body) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")  # running: the one running slot is taken
        queued = threading.Thread(target=hostile_server.post, args=("/generate", generate_body(prompt_ids(8, seed=1), 2)))
        queued.start()
        wait_until(lambda: hostile_server.server_info()["num_queued_reqs"] == 1, 30.0, 0.05)
        for url in (hostile_server.url, router.url):
            resp = httpx.post(url + "/generate", json=generate_body(prompt_ids(8, seed=2), 2), timeout=30.0)
            assert_openai_error(resp, 503)
            assert int(resp.headers["Retry-After"]) >= 1, resp.headers
    queued.join(60.0)
