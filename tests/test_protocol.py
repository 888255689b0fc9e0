"""Request parsing: the three API dialects into one form, and a 400 naming the bad field."""

from __future__ import annotations

import pytest
from pdserve.common.errors import APIError, error_body
from pdserve.server.protocol import (
    MAX_CALL_REQUESTS,
    MAX_LOGIT_BIAS_ENTRIES,
    parse_chat,
    parse_completion,
    parse_generate,
)
from pdserve.server.serving import check_logit_bias

MESSAGES = [{"role": "user", "content": "hi"}]


def rejects(parse, body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        parse(body)
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_completion_defaults() -> None:
    gen = parse_completion({"prompt": "hello"})
    assert gen.prompts == ["hello"] and gen.n == 1 and not gen.stream and gen.model is None
    p = gen.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.logprobs) == (16, 1.0, 1.0, -1, None, False)


def test_completion_prompt_forms() -> None:
    assert parse_completion({"prompt": [1, 2, 3]}).prompts == [[1, 2, 3]]
    assert parse_completion({"prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse_completion({"prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    for bad in (None, "", [], [""], [1, "a"], [[]], [True], [[1, False]], 3, {"a": 1}):
        rejects(parse_completion, {"prompt": bad}, "prompt")


def test_completion_options() -> None:
    gen = parse_completion(
        {"prompt": "x", "max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 3, "min_p": 0.1, "seed": 9,
         "stop": ["a", ""], "stop_token_ids": [7], "ignore_eos": True, "logprobs": 2, "n": 3, "stream": True,
         "stream_options": {"include_usage": True}, "model": "tiny", "frequency_penalty": 1, "repetition_penalty": 1.5}
    )
    p = gen.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (5, 0.0, 0.5, 3, 0.1, 9)
    assert (p.stop_token_ids, p.ignore_eos, p.logprobs, p.top_logprobs) == ((7,), True, True, 2)
    assert (p.frequency_penalty, p.repetition_penalty) == (1.0, 1.5)
    assert gen.stop == ("a",) and gen.n == 3 and gen.stream and gen.include_usage and gen.model == "tiny"
    assert not parse_completion({"prompt": "x", "stream": True, "stream_options": {}}).include_usage
    # Options for a stream that is not one: OpenAI's 400, not a silent no-op.
    rejects(parse_completion, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options")


def test_what_would_be_ignored_is_refused() -> None:
    for body, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
                        ({"tool_choice": "required"}, "tool_choice"), ({"functions": [{"name": "f"}]}, "functions")):
        rejects(parse_completion, {"prompt": "x", **body}, param)
        rejects(parse_chat, {"messages": MESSAGES, **body}, param)
    rejects(parse_completion, {"prompt": "x", "best_of": 2}, "best_of")
    rejects(parse_completion, {"prompt": "x", "n": 2, "best_of": 1}, "best_of")
    # Their neutral values are what a client library may send by default.
    for body in ({"response_format": {"type": "text"}}, {"tool_choice": "none"}, {"function_call": "none"}):
        parse_completion({"prompt": "x", **body})
        parse_chat({"messages": MESSAGES, **body})
    assert parse_completion({"prompt": "x", "n": 2, "best_of": 2}).n == 2


def test_logit_bias() -> None:
    p = parse_completion({"prompt": "x", "logit_bias": {"875": -100, "3": 2.5}}).params
    assert (p.logit_bias_ids, p.logit_bias_values) == ((875, 3), (-100.0, 2.5))
    assert parse_chat({"messages": MESSAGES, "logit_bias": {"7": 100}}).params.logit_bias_ids == (7,)
    assert parse_generate({"text": "a", "sampling_params": {"logit_bias": {"7": 1}}}).params.logit_bias_ids == (7,)
    for empty in ({}, None):
        # No bias: a greedy request keeps the sampler's argmax-only path.
        assert parse_completion({"prompt": "x", "temperature": 0, "logit_bias": empty}).params.argmax_only
    for bad in ([1], {"a": 1}, {"-1": 1}, {"1.5": 1}, {"\u00b2": 1}, {"1" * 5000: 1}, {"3": 101}, {"3": -100.5},
                {"3": "1"}, {"3": True}, {"3": None}, {str(2**31): 1}, {"+7": 1},
                # "07" is 7 again: with "7" beside it, 7's bias would add up past the range.
                {"7": 100, "07": 100}, {str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}):
        rejects(parse_completion, {"prompt": "x", "logit_bias": bad}, "logit_bias")
    assert len(parse_completion({"prompt": "x", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES)}})
               .params.logit_bias_ids) == MAX_LOGIT_BIAS_ENTRIES
    assert parse_completion({"prompt": "x", "logit_bias": {"0": 1}}).params.logit_bias_ids == (0,)


def test_logit_bias_ids_must_be_columns_the_sampler_sees() -> None:
    """Its logits stop at the tokenizer's size, often below the model's vocabulary."""
    params = parse_completion({"prompt": "x", "logit_bias": {"151664": 1}}).params
    check_logit_bias(params, 151665)
    with pytest.raises(APIError) as info:
        check_logit_bias(parse_completion({"prompt": "x", "logit_bias": {"151665": 1}}).params, 151665)
    assert info.value.status == 400 and info.value.param == "logit_bias"


def test_one_call_holds_at_most_max_call_requests() -> None:
    assert len(parse_completion({"prompt": ["a"] * 128, "n": 16}).prompts) * 16 == MAX_CALL_REQUESTS
    rejects(parse_completion, {"prompt": ["a"] * 129, "n": 16}, "prompt")
    rejects(parse_completion, {"prompt": [[1]] * (MAX_CALL_REQUESTS + 1)}, "prompt")
    rejects(parse_generate, {"text": ["a"] * (MAX_CALL_REQUESTS + 1)}, "prompt")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", "5"), ("max_tokens", 1.5), ("max_tokens", True),
        ("temperature", -0.1), ("temperature", "1"), ("top_p", 0), ("top_p", 1.5), ("top_k", 0), ("top_k", -2),
        ("min_p", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
        ("n", 0), ("n", 17), ("logprobs", 21), ("logprobs", -1), ("stop", 5), ("stop", ["a"] * 17),
        ("stop_token_ids", "1"), ("stop_token_ids", [-1]), ("stop_token_ids", [2**40]), ("seed", 2**64),
        ("seed", "x"), ("stream", "true"), ("ignore_eos", 1), ("model", 3), ("echo", True), ("suffix", "x"),
        ("stream_options", []), ("bootstrap_room", -1), ("bootstrap_room", 2**63), ("n", 2.5),
        ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", "3"), ("min_tokens", 1.5),
    ],
)
def test_completion_rejects(field: str, value: object) -> None:
    rejects(parse_completion, {"prompt": "x", field: value}, field)


def test_chat_messages() -> None:
    gen = parse_chat(
        {"messages": [
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
        ]}
    )
    assert gen.prompts == [[
        {"role": "system", "content": "rules"}, {"role": "user", "content": "ab"}, {"role": "assistant", "content": ""},
    ]]
    assert gen.params.max_new_tokens == 4096


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"), (None, "messages"), ("hi", "messages"), (["hi"], "messages[0]"),
        ([{"role": "bot", "content": "x"}], "messages[0].role"), ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
    ],
)
def test_chat_rejects_messages(messages: object, param: str) -> None:
    rejects(parse_chat, {"messages": messages}, param)


def test_chat_max_tokens_names() -> None:
    assert parse_chat({"messages": MESSAGES, "max_tokens": 7}).params.max_new_tokens == 7
    assert parse_chat({"messages": MESSAGES, "max_completion_tokens": 5, "max_tokens": 7}).params.max_new_tokens == 5
    rejects(parse_chat, {"messages": MESSAGES, "max_tokens": 0}, "max_tokens")
    rejects(parse_chat, {"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens")


def test_integral_floats_are_integers() -> None:
    p = parse_completion({"prompt": "x", "max_tokens": 4.0, "n": 2.0, "top_k": 3.0}).params
    assert (p.max_new_tokens, p.top_k) == (4, 3) and isinstance(p.max_new_tokens, int)
    assert parse_completion({"prompt": "x", "n": 2.0}).n == 2


def test_min_tokens_in_each_dialect() -> None:
    assert parse_completion({"prompt": "x"}).params.min_new_tokens == 0
    assert parse_completion({"prompt": "x", "max_tokens": 8, "min_tokens": 8}).params.min_new_tokens == 8
    assert parse_chat({"messages": MESSAGES, "max_completion_tokens": 9, "min_tokens": 3}).params.min_new_tokens == 3
    rejects(parse_chat, {"messages": MESSAGES, "max_completion_tokens": 2, "min_tokens": 3}, "min_tokens")
    sp = {"max_new_tokens": 5, "min_new_tokens": 2}
    assert parse_generate({"text": "x", "sampling_params": sp}).params.min_new_tokens == 2
    rejects(parse_generate, {"text": "x", "sampling_params": {**sp, "min_new_tokens": 6}}, "min_new_tokens")


@pytest.mark.parametrize(("parse", "body", "param"), [
    (parse_completion, {"prompt": "x", "top_p": 1e-46}, "top_p"),
    (parse_completion, {"prompt": "x", "repetition_penalty": 1e-39}, "repetition_penalty"),
    (parse_completion, {"prompt": "x", "stream": True, "stream_options": {"include_usage": "false"}}, "include_usage"),
    (parse_completion, {"prompt": "x", "include_stop_str_in_output": True}, "include_stop_str_in_output"),
    (parse_completion, {"prompt": "x", "skip_special_tokens": False}, "skip_special_tokens"),
    (parse_chat, {"messages": MESSAGES, "continue_final_message": True}, "continue_final_message"),
    (parse_chat, {"messages": MESSAGES, "add_generation_prompt": False}, "add_generation_prompt"),
    (parse_chat, {"messages": MESSAGES, "echo": True}, "echo"),
    (parse_chat, {"messages": MESSAGES, "chat_template": "{{ x }}"}, "chat_template"),
    (parse_generate, {"text": "x", "sampling_params": {"regex": "[0-9]+"}}, "regex"),
    (parse_generate, {"text": "x", "sampling_params": {"json_schema": "{}"}}, "json_schema"),
    (parse_generate, {"text": "x", "sampling_params": {"no_stop_trim": True}}, "no_stop_trim"),
])
def test_what_would_change_the_output_unseen_is_refused(parse, body: dict, param: str) -> None:
    rejects(parse, body, param)


def test_defaults_of_refused_flags_and_sglang_n_are_accepted() -> None:
    gen = parse_chat({"messages": MESSAGES, "add_generation_prompt": True, "skip_special_tokens": True,
                      "include_stop_str_in_output": False, "stream": True, "stream_options": {"include_usage": True}})
    assert gen.include_usage and not gen.max_tokens_given
    assert parse_generate({"text": "x", "sampling_params": {"n": 3}}).n == 3
    assert parse_completion({"prompt": "x", "top_p": 1e-30}).params.top_p == 1e-30  # a normal float32
    assert parse_completion({"prompt": "x", "max_tokens": 5}).max_tokens_given
    assert not parse_generate({"text": "x"}).max_tokens_given


def test_chat_logprobs() -> None:
    p = parse_chat({"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}).params
    assert (p.logprobs, p.top_logprobs) == (True, 2)
    assert not parse_chat({"messages": MESSAGES, "logprobs": False}).params.logprobs
    rejects(parse_chat, {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs")
    rejects(parse_chat, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs")
    rejects(parse_chat, {"messages": MESSAGES, "logprobs": 1}, "logprobs")
    rejects(parse_chat, {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools")


def test_generate() -> None:
    gen = parse_generate(
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3, "temperature": 0, "stop": "x", "sampling_seed": 4},
         "return_logprob": True, "top_logprobs_num": 2, "stream": True}
    )
    p = gen.params
    assert gen.prompts == [[1, 2]] and gen.stop == ("x",) and gen.stream
    assert (p.max_new_tokens, p.temperature, p.seed, p.logprobs, p.top_logprobs) == (3, 0.0, 4, True, 2)
    assert parse_generate({"text": "hi"}).params.max_new_tokens == 128
    rejects(parse_generate, {}, "text")
    rejects(parse_generate, {"text": "a", "input_ids": [1]}, "text")
    rejects(parse_generate, {"text": "a", "sampling_params": []}, "sampling_params")
    rejects(parse_generate, {"text": "a", "sampling_params": {"sampling_seed": 2**70}}, "sampling_seed")
    rejects(parse_generate, {"text": "a", "return_logprob": True, "top_logprobs_num": 99}, "top_logprobs_num")


def test_error_body_shape() -> None:
    body = APIError(404, "no such model", "model", "model_not_found").body()
    assert body["error"] == {"message": "no such model", "type": "NotFoundError", "param": "model", "code": "model_not_found"}
    assert error_body(400, "bad")["error"]["code"] == 400
    assert error_body(503, "busy")["error"]["type"] == "ServiceUnavailableError"
