"""A colocated server decodes exactly what transformers decodes, alone or batched.

The main server runs with 4-token pages and 16-token prefill chunks, so the
prompts below sit below, on and across page and chunk borders.
"""

from __future__ import annotations

import pytest
from pdserve.tests.support.hf_oracle import HFOracle
from pdserve.tests.support.payloads import generate_body, prompt_ids, sse_events
from pdserve.tests.support.server_process import ServerProcess, post_concurrently

PROMPT_LENS = (1, 3, 4, 5, 15, 16, 17, 33, 70)
MAX_NEW = 12
TEXT_PROMPTS = (
    "The quick brown fox",
    "In the beginning the server was quiet. Then the requests arrived: first one, then ten, then a thousand.",
)


def _generate(server: ServerProcess, ids: list[int], max_new: int = MAX_NEW, **sampling: object) -> dict:
    resp = server.post("/generate", generate_body(ids, max_new, **sampling))
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize("length", PROMPT_LENS)
def test_greedy_ids_match_oracle_one_by_one(main_server: ServerProcess, oracle: HFOracle, length: int) -> None:
    ids = prompt_ids(length, seed=length)
    out = _generate(main_server, ids)
    assert out["output_ids"] == oracle.greedy(ids, MAX_NEW)
    assert out["meta_info"]["prompt_tokens"] == length
    assert out["meta_info"]["finish_reason"]["type"] == "length"


def test_greedy_ids_match_oracle_all_at_once(main_server: ServerProcess, oracle: HFOracle) -> None:
    prompts = [prompt_ids(n, seed=1000 + n) for n in PROMPT_LENS]
    expected = [oracle.greedy(ids, MAX_NEW) for ids in prompts]
    responses = post_concurrently(main_server, "/generate", [generate_body(ids, MAX_NEW) for ids in prompts])
    assert [r.json()["output_ids"] for r in responses] == expected
    # One call carrying every prompt: the engine receives them together.
    batch = main_server.post("/generate", generate_body(prompts, MAX_NEW))
    assert batch.status_code == 200, batch.text
    assert [b["output_ids"] for b in batch.json()] == expected
    assert [b["index"] for b in batch.json()] == list(range(len(prompts)))
    assert len({b["meta_info"]["id"] for b in batch.json()}) == len(prompts)
    # Streamed, each chunk says whose it is: the answers rebuild from their chunks.
    streamed = main_server.post("/generate", {**generate_body(prompts, MAX_NEW), "stream": True})
    assert streamed.status_code == 200, streamed.text
    last = {e["index"]: e for e in sse_events(streamed)}
    assert [last[i]["output_ids"] for i in range(len(prompts))] == expected


@pytest.mark.parametrize("prompt", TEXT_PROMPTS)
def test_completion_text_matches_oracle(main_server: ServerProcess, oracle: HFOracle, prompt: str) -> None:
    ids = oracle.text_ids(prompt)
    expected = oracle.greedy(ids, MAX_NEW)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    resp = main_server.post("/v1/completions", body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["text"] == oracle.decode(expected)
    assert choice["finish_reason"] == "length"
    usage = resp.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(ids), MAX_NEW)
    assert usage["total_tokens"] == len(ids) + MAX_NEW
    by_ids = main_server.post("/v1/completions", {**body, "prompt": ids})
    assert by_ids.json()["choices"][0]["text"] == choice["text"]


def test_prefix_cache_hit_keeps_output(main_server: ServerProcess, oracle: HFOracle) -> None:
    assert main_server.post("/flush_cache", {}).status_code == 200
    ids = prompt_ids(70, seed=7)
    expected = oracle.greedy(ids, MAX_NEW)
    first = _generate(main_server, ids)
    second = _generate(main_server, ids)
    assert first["meta_info"]["cached_tokens"] == 0
    cached = second["meta_info"]["cached_tokens"]
    assert 64 <= cached < len(ids) and cached % 4 == 0, cached
    assert first["output_ids"] == second["output_ids"] == expected
    # A prompt that leaves the cached one in the middle of a page.
    branch = ids[:42] + prompt_ids(20, seed=8)
    out = _generate(main_server, branch)
    assert out["meta_info"]["cached_tokens"] == 40
    assert out["output_ids"] == oracle.greedy(branch, MAX_NEW)


def test_no_prefix_cache_when_disabled(small_server: ServerProcess, oracle: HFOracle) -> None:
    ids = prompt_ids(40, seed=9)
    outs = [_generate(small_server, ids) for _ in range(2)]
    assert [o["meta_info"]["cached_tokens"] for o in outs] == [0, 0]
    assert outs[0]["output_ids"] == outs[1]["output_ids"] == oracle.greedy(ids, MAX_NEW)
    assert small_server.server_info()["kv_pool"]["cached_pages"] == 0


def test_seeded_sampling_is_reproducible(main_server: ServerProcess) -> None:
    ids = prompt_ids(10, seed=11)
    sampling = {"temperature": 1.5, "top_p": 1.0}
    bodies = [generate_body(ids, 24, sampling_seed=seed, **sampling) for seed in (1, 1, 2)]
    # Batched together and alone: a seeded request does not depend on its neighbours.
    together = [r.json()["output_ids"] for r in post_concurrently(main_server, "/generate", bodies)]
    alone = _generate(main_server, ids, 24, sampling_seed=1, **sampling)["output_ids"]
    assert together[0] == together[1] == alone
    assert together[2] != together[0]
    body = {"prompt": ids, "max_tokens": 24, "temperature": 1.5, "seed": 1, "ignore_eos": True}
    texts = [main_server.post("/v1/completions", body).json()["choices"][0]["text"] for _ in range(2)]
    assert texts[0] == texts[1]


def _stop_case(oracle: HFOracle) -> tuple[list[int], str, str]:
    """A prompt, a stop string taken from its greedy text, and the text before it."""
    ids = prompt_ids(12, seed=13)
    text = oracle.decode(oracle.greedy(ids, 24))
    start = next(k for k in range(6, len(text) - 3) if text[k : k + 3].strip())
    stop = text[start : start + 3]
    expected = text[: text.find(stop)]
    assert expected, (text, stop)
    return ids, stop, expected


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_exactly(main_server: ServerProcess, oracle: HFOracle, stream: bool) -> None:
    ids, stop, expected = _stop_case(oracle)
    body = {"prompt": ids, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop], "stream": stream}
    resp = main_server.post("/v1/completions", body)
    assert resp.status_code == 200, resp.text
    if stream:
        chunks = [e["choices"][0] for e in sse_events(resp)]
        text = "".join(c["text"] for c in chunks)
        assert all(stop not in c["text"] for c in chunks)
        assert chunks[-1]["finish_reason"] == "stop"
    else:
        choice = resp.json()["choices"][0]
        text = choice["text"]
        assert (choice["finish_reason"], choice["matched_stop"]) == ("stop", stop)
    assert text == expected


def test_stop_string_on_generate(main_server: ServerProcess, oracle: HFOracle) -> None:
    ids, stop, expected = _stop_case(oracle)
    out = _generate(main_server, ids, 24, stop=stop)
    assert out["text"] == expected
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_stop_token_ids(main_server: ServerProcess, oracle: HFOracle) -> None:
    ids = prompt_ids(9, seed=17)
    greedy = oracle.greedy(ids, 20)
    token = greedy[6]
    cut = greedy.index(token) + 1
    out = _generate(main_server, ids, 20, stop_token_ids=[token])
    assert out["output_ids"] == greedy[:cut]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": token}


def test_logit_bias_bans_and_forces_tokens(main_server: ServerProcess, oracle: HFOracle) -> None:
    ids = prompt_ids(9, seed=23)
    greedy = oracle.greedy(ids, 4)
    # The greedy first token banned: the answer takes the runner-up instead.
    banned = _generate(main_server, ids, 4, logit_bias={str(greedy[0]): -100})["output_ids"]
    (first, runner_up), = oracle.top_logprobs(ids, 1, 2)
    assert first[0] == greedy[0] and banned[0] == runner_up[0]
    # A token favoured by +100 wins every step, through the OpenAI route too.
    assert _generate(main_server, ids, 3, logit_bias={"7": 100})["output_ids"] == [7, 7, 7]
    forced = main_server.post("/v1/completions", {"prompt": ids, "max_tokens": 3, "temperature": 0,
                                                  "logit_bias": {"7": 100}})
    assert forced.status_code == 200 and forced.json()["choices"][0]["text"] == oracle.decode([7, 7, 7]), forced.text
    # An id past the logits' row is the caller's error, not the engine's.
    vocab = oracle.model.config.vocab_size
    refused = main_server.post("/v1/completions", {"prompt": ids, "logit_bias": {str(vocab): 1}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logit_bias", refused.text
    assert _generate(main_server, ids, 4)["output_ids"] == greedy  # and the server serves on


def test_min_tokens_holds_back_eos(main_server: ServerProcess, oracle: HFOracle) -> None:
    """EOS forced by +100 comes only once min_new_tokens / min_tokens are out."""
    ids = prompt_ids(9, seed=29)
    eos = oracle.model.config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    greedy = oracle.greedy(ids, 3)
    assert not set(greedy) & set(eos)
    force = {str(eos[0]): 100}
    assert _generate(main_server, ids, 8, ignore_eos=False, logit_bias=force)["output_ids"] == [eos[0]]
    out = _generate(main_server, ids, 8, ignore_eos=False, logit_bias=force, min_new_tokens=3)
    assert out["output_ids"] == greedy + [eos[0]]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos[0]}
    resp = main_server.post("/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0,
                                                "logit_bias": force, "min_tokens": 3})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == oracle.decode(greedy)


def _completion(server: ServerProcess, stream: bool, **body: object) -> tuple[str, str | None]:
    resp = server.post("/v1/completions", {**body, "stream": stream})
    assert resp.status_code == 200, resp.text
    if not stream:
        choice = resp.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    chunks = [e["choices"][0] for e in sse_events(resp)]
    return "".join(c["text"] for c in chunks), chunks[-1]["finish_reason"]


def _chat(server: ServerProcess, stream: bool, **body: object) -> tuple[str, str | None]:
    resp = server.post("/v1/chat/completions", {**body, "stream": stream})
    assert resp.status_code == 200, resp.text
    if not stream:
        choice = resp.json()["choices"][0]
        assert choice["message"]["role"] == "assistant"
        return choice["message"]["content"], choice["finish_reason"]
    events = sse_events(resp)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    chunks = [e["choices"][0] for e in events]
    return "".join(c["delta"].get("content") or "" for c in chunks), chunks[-1]["finish_reason"]


def test_stream_equals_non_stream_completions(main_server: ServerProcess, oracle: HFOracle) -> None:
    body = {"prompt": "Emoji: 🙂 😀 中文：你好", "max_tokens": 20, "temperature": 0}
    plain, streamed = _completion(main_server, False, **body), _completion(main_server, True, **body)
    assert plain == streamed
    ids = oracle.text_ids(body["prompt"])
    greedy = oracle.greedy(ids, 20)
    eos = {oracle.tokenizer.eos_token_id, oracle.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    # Without ignore_eos the oracle's continuation ends at its first EOS.
    cut = next((i for i, t in enumerate(greedy) if t in eos), None)
    assert plain[0] == oracle.decode(greedy if cut is None else greedy[:cut])
    assert plain[1] == ("length" if cut is None else "stop")


def test_stream_equals_non_stream_chat(main_server: ServerProcess, oracle: HFOracle) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "日本語：こんにちは 🚀 Why is the sky blue?"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    plain, streamed = _chat(main_server, False, **body), _chat(main_server, True, **body)
    assert plain == streamed
    assert plain[0] == oracle.decode(oracle.greedy(oracle.chat_ids(messages), 20))
    sampled = {**body, "temperature": 1.5, "seed": 3}
    assert _chat(main_server, False, **sampled) == _chat(main_server, True, **sampled)


def test_generate_stream_is_cumulative(main_server: ServerProcess, oracle: HFOracle) -> None:
    ids = prompt_ids(18, seed=19)
    resp = main_server.post("/generate", {**generate_body(ids, MAX_NEW), "stream": True})
    events = sse_events(resp)
    assert len(events) > 1
    lengths = [len(e["output_ids"]) for e in events]
    assert lengths == sorted(lengths) and events[-1]["output_ids"] == oracle.greedy(ids, MAX_NEW)
    assert events[-1]["text"] == oracle.decode(events[-1]["output_ids"])
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_n_choices_and_usage(main_server: ServerProcess) -> None:
    body = {"prompt": ["The quick brown fox", "Call me Ishmael."], "n": 2, "max_tokens": 6, "temperature": 1.5,
            "seed": 8, "ignore_eos": True}
    plain = main_server.post("/v1/completions", body).json()
    assert [c["index"] for c in plain["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in plain["choices"]]
    assert len(set(texts)) > 1  # the samples of one prompt get different seeds
    usage = plain["usage"]
    assert usage["completion_tokens"] == 4 * 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    streamed = main_server.post("/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(streamed)
    # The same counts; only the prompt's cached part differs, the second time round.
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert {k: v for k, v in events[-1]["usage"].items() if k != "prompt_tokens_details"} == {
        k: v for k, v in usage.items() if k != "prompt_tokens_details"
    }
    joined = ["".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i) for i in range(4)]
    assert joined == texts
