"""Reported logprobs are log_softmax of the model's raw logits, as transformers computes them."""

from __future__ import annotations

import math

import pytest
from pdserve.tests.support.hf_oracle import HFOracle
from pdserve.tests.support.payloads import generate_body, prompt_ids, sse_events
from pdserve.tests.support.server_process import ServerProcess

MAX_NEW = 8
TOL = 1e-4


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return prompt_ids(21, seed=21)


def _check_top(oracle_top: list[tuple[int, float]], got: list[tuple[int, float]]) -> None:
    assert [t for t, _ in got] == [t for t, _ in oracle_top]
    for (_, expected), (_, value) in zip(oracle_top, got):
        assert math.isclose(value, expected, abs_tol=TOL)


def test_generate_return_logprob(main_server: ServerProcess, oracle: HFOracle, prompt: list[int]) -> None:
    body = {**generate_body(prompt, MAX_NEW), "return_logprob": True, "top_logprobs_num": 2}
    meta = main_server.post("/generate", body).json()["meta_info"]
    expected = oracle.greedy_logprobs(prompt, MAX_NEW)
    chosen = meta["output_token_logprobs"]
    assert [t for _, t, _ in chosen] == oracle.greedy(prompt, MAX_NEW)
    assert all(math.isclose(lp, e, abs_tol=TOL) for (lp, _, _), e in zip(chosen, expected)), (chosen, expected)
    for step, top in enumerate(meta["output_top_logprobs"]):
        _check_top(oracle.top_logprobs(prompt, MAX_NEW, 2)[step], [(t, lp) for lp, t, _ in top])


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs(main_server: ServerProcess, oracle: HFOracle, prompt: list[int], stream: bool) -> None:
    body = {"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True, "logprobs": 2, "stream": stream}
    resp = main_server.post("/v1/completions", body)
    assert resp.status_code == 200, resp.text
    if stream:
        parts = [e["choices"][0]["logprobs"] for e in sse_events(resp)]
        token_lps = [lp for p in parts if p for lp in p["token_logprobs"]]
        tops = [t for p in parts if p for t in p["top_logprobs"]]
        # Offsets count from the completion's start across chunks, as in one answer.
        offsets = [o for p in parts if p for o in p["text_offset"]]
        tokens = [t for p in parts if p for t in p["tokens"]]
        assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    else:
        lp = resp.json()["choices"][0]["logprobs"]
        token_lps, tops = lp["token_logprobs"], lp["top_logprobs"]
        assert len(lp["tokens"]) == len(lp["text_offset"]) == MAX_NEW
    expected = oracle.greedy_logprobs(prompt, MAX_NEW)
    assert len(token_lps) == MAX_NEW
    assert all(math.isclose(a, b, abs_tol=TOL) for a, b in zip(token_lps, expected)), (token_lps, expected)
    oracle_top = oracle.top_logprobs(prompt, MAX_NEW, 2)
    for step, top in enumerate(tops):
        assert len(top) == 2
        # Greedy: the best of the top two is the chosen token itself.
        assert math.isclose(max(top.values()), expected[step], abs_tol=TOL)
        assert sorted(top.values(), reverse=True) == pytest.approx([lp for _, lp in oracle_top[step]], abs=TOL)


def test_chat_logprobs(main_server: ServerProcess, oracle: HFOracle) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    body = {"messages": messages, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    content = main_server.post("/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    ids = oracle.chat_ids(messages)
    expected = oracle.greedy_logprobs(ids, MAX_NEW)
    oracle_top = oracle.top_logprobs(ids, MAX_NEW, 2)
    assert len(content) == MAX_NEW
    for step, entry in enumerate(content):
        assert math.isclose(entry["logprob"], expected[step], abs_tol=TOL)
        assert len(entry["top_logprobs"]) == 2
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([lp for _, lp in oracle_top[step]], abs=TOL)
        assert entry["top_logprobs"][0]["token"] == entry["token"]


def test_chat_logprob_bytes_rebuild_the_text(main_server: ServerProcess) -> None:
    """Tokens may end inside a UTF-8 character; their bytes still add up to the text."""
    body = {
        "messages": [{"role": "user", "content": "Emoji: 🙂 😀 😂"}], "max_tokens": 24, "temperature": 0,
        "ignore_eos": True, "logprobs": True, "top_logprobs": 1,
    }
    choice = main_server.post("/v1/chat/completions", body).json()["choices"][0]
    special = {"<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"}
    pieces = [bytes(e["bytes"]) for e in choice["logprobs"]["content"] if e["token"] not in special]
    assert any(p.decode("utf-8", errors="replace") != p.decode("utf-8", errors="ignore") for p in pieces)
    raw = b"".join(pieces)
    assert raw.decode("utf-8", errors="replace") == choice["message"]["content"]
