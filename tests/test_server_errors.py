"""Bad input gets an OpenAI error object with the right 4xx, and never reaches the engine."""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

import httpx
import pytest
from pdserve.tests.support.hf_oracle import HFOracle
from pdserve.tests.support.openai_errors import assert_openai_error
from pdserve.tests.support.payloads import generate_body, prompt_ids, sse_events
from pdserve.tests.support.server_process import ServerProcess, server_fixture
from pdserve.tests.support.waiting import wait_until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 4}


queue_server = server_fixture(
    ("--page-size", "4", "--max-running-requests", "1", "--max-queued-requests", "2", "--max-total-tokens", "4096"),
    "queue.log")


def test_invalid_json(main_server: ServerProcess) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        resp = httpx.post(main_server.url + path, content=b'{"prompt": "x",', headers={"Content-Type": "application/json"})
        assert_openai_error(resp, 400)
    not_an_object = httpx.post(main_server.url + "/v1/completions", content=b"[1, 2]")
    assert_openai_error(not_an_object, 400)


def test_an_answer_without_max_tokens_gets_what_the_context_leaves(main_server: ServerProcess) -> None:
    """Chat's default length (4096) is past this model's context: left unset, it
    shrinks to fit instead of a 400 naming a field the client never sent."""
    resp = main_server.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                     "temperature": 0, "min_tokens": 3})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 3
    too_long = main_server.post("/v1/chat/completions", {"model": "tiny", "max_tokens": 4096,
                                                         "messages": [{"role": "user", "content": "Hi"}]})
    assert_openai_error(too_long, 400, "maximum context length")


def test_a_compressed_body_is_415_and_identity_is_read(main_server: ServerProcess) -> None:
    body = json.dumps({**COMPLETION, "max_tokens": 2}).encode()
    for path in ("/v1/completions", "/generate"):
        gz = httpx.post(main_server.url + path, content=gzip.compress(body),
                        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert_openai_error(gz, 415, "Content-Encoding")
    plain = httpx.post(main_server.url + "/v1/completions", content=body,
                       headers={"Content-Type": "application/json", "Content-Encoding": "identity"})
    assert plain.status_code == 200, plain.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "tiny", "max_tokens": 4}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": 42}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
        ("/v1/completions", {**COMPLETION, "max_tokens": "4"}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "stream": "yes"}, "stream"),
        ("/v1/completions", {**COMPLETION, "stop": 3}, "stop"),
        ("/v1/chat/completions", {"model": "tiny"}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
        ("/generate", {"sampling_params": {}}, "text"),
        ("/generate", {"text": "hi", "input_ids": [1, 2]}, "text"),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2.5}}, "max_new_tokens"),
        ("/generate", {"input_ids": [[1, 2], [True, 3]]}, "prompt"),
        # Integers wider than the engine pipe's int64 are the caller's error, not a 500.
        ("/v1/completions", {**COMPLETION, "seed": 2**70}, "seed"),
        ("/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [10**30]}}, "stop_token_ids"),
        ("/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [-1]}}, "stop_token_ids"),
    ],
)
def test_missing_or_wrong_typed_fields(main_server: ServerProcess, path: str, body: dict, param: str) -> None:
    assert_openai_error(main_server.post(path, body), 400, param=param)


@pytest.mark.parametrize("max_tokens", [0, -5, 10**9])
def test_bad_max_tokens(main_server: ServerProcess, max_tokens: int) -> None:
    assert_openai_error(main_server.post("/v1/completions", {**COMPLETION, "max_tokens": max_tokens}), 400, param="max_tokens")
    assert_openai_error(main_server.post("/v1/chat/completions", {**CHAT, "max_tokens": max_tokens}), 400, param="max_tokens")


def test_negative_temperature(main_server: ServerProcess) -> None:
    assert_openai_error(main_server.post("/v1/completions", {**COMPLETION, "temperature": -0.5}), 400, param="temperature")


@pytest.mark.parametrize("top_p", [0, -0.1, 1.01])
def test_top_p_out_of_range(main_server: ServerProcess, top_p: float) -> None:
    assert_openai_error(main_server.post("/v1/chat/completions", {**CHAT, "top_p": top_p}), 400, param="top_p")


def test_unknown_model(main_server: ServerProcess) -> None:
    assert_openai_error(main_server.post("/v1/completions", {**COMPLETION, "model": "gpt-17"}), 404, param="model",
                        code="model_not_found")
    assert_openai_error(main_server.post("/v1/chat/completions", {**CHAT, "model": "gpt-17"}), 404, param="model")
    assert_openai_error(main_server.get("/v1/models/gpt-17"), 404)


def test_empty_messages(main_server: ServerProcess) -> None:
    assert_openai_error(main_server.post("/v1/chat/completions", {**CHAT, "messages": []}), 400, param="messages")


@pytest.mark.parametrize("bad_id", [-1, 1000, 10**6])
def test_token_ids_outside_vocabulary(main_server: ServerProcess, bad_id: int) -> None:
    assert_openai_error(main_server.post("/generate", generate_body([5, bad_id, 7], 2)), 400, param="prompt")
    assert_openai_error(main_server.post("/v1/completions", {**COMPLETION, "prompt": [5, bad_id]}), 400, param="prompt")


def test_prompt_longer_than_context(main_server: ServerProcess) -> None:
    context_len = main_server.server_info()["context_len"]
    too_long = prompt_ids(context_len + 10, seed=3)
    assert_openai_error(main_server.post("/generate", generate_body(too_long, 4)), 400, code="context_length_exceeded")
    # The prompt fits, the prompt plus max_tokens does not.
    fits = prompt_ids(context_len - 10, seed=3)
    assert_openai_error(main_server.post("/v1/completions", {**COMPLETION, "prompt": fits, "max_tokens": 20}), 400, param="max_tokens")


def test_auto_truncate_serves_long_prompts(small_server: ServerProcess) -> None:
    assert small_server.server_info()["context_len"] == 64
    resp = small_server.post("/generate", generate_body(prompt_ids(200, seed=4), 8))
    assert resp.status_code == 200, resp.text
    meta = resp.json()["meta_info"]
    assert meta["completion_tokens"] == 8
    assert meta["prompt_tokens"] + meta["completion_tokens"] <= 64
    text = small_server.post("/v1/completions", {"prompt": "The quick brown fox " * 40, "max_tokens": 8})
    assert text.status_code == 200, text.text


def test_auto_truncate_keeps_a_fitting_prompt_whole(small_server: ServerProcess, oracle: HFOracle) -> None:
    ids = prompt_ids(40, seed=5)
    resp = small_server.post("/generate", generate_body(ids, 50))
    assert resp.status_code == 200, resp.text
    # The answer is shortened to the context, the prompt is not cut.
    assert resp.json()["meta_info"]["prompt_tokens"] == 40
    assert resp.json()["output_ids"] == oracle.greedy(ids, 24)


@contextmanager
def _running_slot_held(server: ServerProcess) -> Iterator[None]:
    """A long streamed request holds the one running slot until the block ends
    (its client then leaves, which aborts it)."""
    long_body = {**generate_body(prompt_ids(8, seed=0), 1500), "stream": True}
    with server.client() as client, client.stream("POST", "/generate", json=long_body) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: a collected line iterator closes the stream
        assert next(lines).startswith("data: ")  # running now
        yield


def _two_refused_while_busy(server: ServerProcess, path: str, bodies: list[dict]) -> list[httpx.Response]:
    """While the running slot is held, the four ``bodies`` are sent: two wait
    in the two queue slots and two are refused (each a 503 error), however they
    interleave; returns the queued ones' responses."""
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        with _running_slot_held(server):
            futures = [pool.submit(server.post, path, body) for body in bodies]
            refused = list(itertools.islice(as_completed(futures, timeout=30), 2))
            for future in refused:
                assert_openai_error(future.result(), 503)
                assert int(future.result().headers["Retry-After"]) >= 1  # overload says when to retry
        # The long request is gone with its client: the queued ones run.
        return [f.result(timeout=60) for f in futures if f not in refused]


def test_too_many_queued_requests(queue_server: ServerProcess) -> None:
    bodies = [generate_body(prompt_ids(8, seed=i), 60) for i in range(1, 5)]
    for resp in _two_refused_while_busy(queue_server, "/generate", bodies):
        assert resp.status_code == 200 and len(resp.json()["output_ids"]) == 60


def test_failed_choice_cancels_its_siblings(queue_server: ServerProcess) -> None:
    """One queue slot is taken, so of a call's two choices the first is queued
    and the second refused: the call fails and takes the first one with it."""
    before = queue_server.server_info()["num_generated_tokens"]
    body = {"prompt": prompt_ids(8, seed=9), "n": 2, "max_tokens": 1500, "ignore_eos": True}
    with ThreadPoolExecutor(max_workers=1) as pool:
        with _running_slot_held(queue_server):
            waiting = pool.submit(queue_server.post, "/generate", generate_body(prompt_ids(8, seed=8), 4))
            wait_until(lambda: queue_server.server_info()["num_queued_reqs"] == 1, 10.0, 0.02, lambda: "never queued")
            assert_openai_error(queue_server.post("/v1/completions", body), 503)
        assert waiting.result(timeout=60).status_code == 200
    info = queue_server.wait_idle(3.0)
    assert info["kv_pool"]["used_pages"] == 0 and info["num_running_reqs"] == 0, info
    # The long request and the waiting one made a few dozen tokens at most.
    assert info["num_generated_tokens"] - before < 1500


def test_a_call_of_more_choices_than_the_queue_is_refused(queue_server: ServerProcess) -> None:
    """Each choice counts as a queued request: a call of more could never be
    admitted, so it is the caller's error (400), not a 503 to retry forever."""
    assert_openai_error(queue_server.post("/v1/completions", {"prompt": "hi", "n": 3, "max_tokens": 2}), 400,
                        "max_queued_requests")
    assert_openai_error(queue_server.post("/generate", {"text": ["a", "b", "c"]}), 400)
    resp = queue_server.post("/v1/completions", {"prompt": "hi", "n": 2, "max_tokens": 2})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 2


def test_n_choices_with_the_largest_seed(main_server: ServerProcess) -> None:
    body = {"prompt": "hi", "n": 2, "max_tokens": 3, "temperature": 1.0, "seed": 2**63 - 1}
    resp = main_server.post("/v1/completions", body)
    assert resp.status_code == 200, resp.text
    assert [c["index"] for c in resp.json()["choices"]] == [0, 1]


def test_too_many_queued_streaming_requests(queue_server: ServerProcess) -> None:
    """A rejected stream gets the 503 status itself, not a 200 stream carrying an error."""
    bodies = [{"prompt": prompt_ids(8, seed=i), "max_tokens": 30, "ignore_eos": True, "stream": True} for i in range(1, 5)]
    for resp in _two_refused_while_busy(queue_server, "/v1/completions", bodies):
        assert resp.status_code == 200
        assert sse_events(resp)[-1]["choices"][0]["finish_reason"] == "length"


def test_unknown_route_and_method(main_server: ServerProcess) -> None:
    assert_openai_error(main_server.post("/v1/nothing", {}), 404)
    assert_openai_error(main_server.get("/v1/completions"), 405)


def test_huge_top_k_means_whole_vocabulary(main_server: ServerProcess) -> None:
    body = {**COMPLETION, "top_k": 10**30, "temperature": 1.0, "seed": 5}
    resp = main_server.post("/v1/completions", body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == main_server.post("/v1/completions", {**body, "top_k": -1}).json()["choices"][0]["text"]
