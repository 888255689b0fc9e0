"""Parse and validate API request bodies into one internal form.

Every check raises :class:`APIError` with the offending ``param``, so bad input
becomes a 4xx OpenAI error and never reaches the engine. Three dialects are
accepted: OpenAI completions, OpenAI chat completions, SGLang's ``/generate``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, replace
from typing import Any

from pdserve.common.errors import APIError
from pdserve.common.sampling_params import SamplingParams

MAX_LOGPROBS = 20
# Sub-requests (prompts x n) in one call: a bound on what one call puts ahead of
# everyone else's. Under PD each holds KV pages on a decode instance from the
# moment it arrives there until its prefill comes; one call of 16,000 held 96%
# of a CPU cluster's decode pages, and its prefill queue, for over a minute.
MAX_CALL_REQUESTS = 2048
_PENALTY_RANGE = (-2.0, 2.0)
_LOGIT_BIAS_RANGE = (-100.0, 100.0)
# Entries of one logit_bias: the sampler adds them on every step of the request.
MAX_LOGIT_BIAS_ENTRIES = 300
# Integers cross the engine pipe as msgpack int64: anything wider must be a 400, not a 500.
_INT64 = (-(2**63), 2**63 - 1)
_MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True)
class GenerationInput:
    """One API call, before tokenization: one or more prompts sharing parameters."""

    prompts: list[str | list[int] | list[dict]]  # text, token ids, or chat messages
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    model: str | None = None
    bootstrap_room: int | None = None
    prefill_instance_id: str | None = None
    return_timing: bool = False  # answer with the request's journey (``timing``)
    # False when the call left the answer's length to the server: a long prompt
    # then gets what the context leaves, as vLLM and SGLang do, not a 400.
    max_tokens_given: bool = True
    extra: dict = field(default_factory=dict)


def _get(body: dict, name: str, types: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise APIError(400, f"'{name}' must be of type {'/'.join(t.__name__ for t in types)}", name)
    if isinstance(value, float) and int in types and float not in types and value.is_integer():
        return int(value)  # 4.0 is 4, as the OpenAI-compatible servers' request models read it
    if not isinstance(value, types):
        raise APIError(400, f"'{name}' must be of type {'/'.join(t.__name__ for t in types)}", name)
    return value


def _float(body: dict, name: str, default: float) -> float:
    """A finite number (an integer too wide for a float is the caller's error too)."""
    value = _get(body, name, (int, float), default)
    try:
        number = float(value)
    except OverflowError:
        raise APIError(400, f"'{name}' is out of range", name) from None
    _check(math.isfinite(number), f"'{name}' must be a finite number", name)
    return number


def _check(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise APIError(400, message, param)


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        _check(len(value) <= 16, "at most 16 stop sequences", "stop")
        return tuple(s for s in value if s)
    raise APIError(400, "'stop' must be a string or a list of strings", "stop")


def _all_ints(values: list) -> bool:
    """Whether every item is an int, not a bool: one pass at C speed (a prompt
    of token ids holds thousands, and each one's check is on its first token's path)."""
    return set(map(type, values)) <= {int}


def _token_ids(value: Any, param: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and _all_ints(value) and (not value or 0 <= min(value) <= max(value) <= _MAX_TOKEN_ID):
        return tuple(value)
    raise APIError(400, f"'{param}' must be a list of token ids", param)


def _seed(body: dict, name: str) -> int | None:
    seed = _get(body, name, (int,))
    _check(seed is None or _INT64[0] <= seed <= _INT64[1], f"'{name}' must be a 64-bit integer", name)
    return seed


def _sampling(body: dict, max_tokens_names: tuple[str, ...], default_max: int,
              min_tokens_name: str = "min_tokens") -> tuple[SamplingParams, bool]:
    """The request's sampling parameters, and whether it set the answer's length."""
    max_tokens, max_name, max_given = default_max, max_tokens_names[0], False
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens, max_name, max_given = _get(body, name, (int,)), name, True
            break
    _check(max_tokens >= 1, f"'{max_name}' must be at least 1", max_name)
    min_tokens = _get(body, min_tokens_name, (int,), 0)
    _check(0 <= min_tokens <= max_tokens, f"'{min_tokens_name}' must be in [0, {max_name}]", min_tokens_name)
    temperature = _float(body, "temperature", 1.0)
    _check(temperature >= 0, "'temperature' must be >= 0", "temperature")
    top_p = _float(body, "top_p", 1.0)
    _check(0 < top_p <= 1 and _positive_in_float32(top_p), "'top_p' must be in (0, 1]", "top_p")
    top_k = _get(body, "top_k", (int,), -1)
    _check(top_k == -1 or top_k >= 1, "'top_k' must be -1 (disabled) or >= 1", "top_k")
    top_k = min(top_k, _MAX_TOKEN_ID)  # any k beyond the vocabulary means all of it
    min_p = _float(body, "min_p", 0.0)
    _check(0 <= min_p <= 1, "'min_p' must be in [0, 1]", "min_p")
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        penalties[name] = _float(body, name, 0.0)
        _check(_PENALTY_RANGE[0] <= penalties[name] <= _PENALTY_RANGE[1], f"'{name}' must be in [-2, 2]", name)
    repetition = _float(body, "repetition_penalty", 1.0)
    # Positive logits are divided by it: below 1e-6 they overflow float32 and every token ties.
    _check(MIN_REPETITION_PENALTY <= repetition <= 2, f"'repetition_penalty' must be in [{MIN_REPETITION_PENALTY}, 2]",
           "repetition_penalty")
    seed = _seed(body, "seed")
    bias_ids, bias_values = _logit_bias(body.get("logit_bias"))
    return SamplingParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition,
        stop_token_ids=_token_ids(body.get("stop_token_ids"), "stop_token_ids"),
        ignore_eos=bool(_get(body, "ignore_eos", (bool,), False)),
        seed=seed,
        logit_bias_ids=bias_ids,
        logit_bias_values=bias_values,
        **penalties,
    ), max_given


MIN_REPETITION_PENALTY = 1e-6


def _positive_in_float32(x: float) -> bool:
    """Whether ``x`` stays above 0 in float32, the sampler's precision (1e-46 is 0 there)."""
    return struct.unpack("f", struct.pack("f", x))[0] > 0


def _logit_bias(value: Any) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """OpenAI's ``{"token id": bias}``, bias in [-100, 100], as two columns
    (ids beyond the vocabulary are refused where its size is known)."""
    if value is None:
        return (), ()
    _check(isinstance(value, dict), "'logit_bias' must be an object of token ids to biases", "logit_bias")
    _check(len(value) <= MAX_LOGIT_BIAS_ENTRIES, f"'logit_bias' may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries",
           "logit_bias")
    ids, biases = [], []
    for key, bias in value.items():
        # A short ASCII decimal in canonical form: int() of thousands of digits
        # raises, of "²" too, and "07" would add to 7's bias past the range.
        _check(key.isascii() and key.isdigit() and len(key) <= 10 and key == str(int(key)) and int(key) <= _MAX_TOKEN_ID,
               f"'logit_bias' keys must be token ids, not {key[:20]!r}", "logit_bias")
        _check(type(bias) in (int, float) and _LOGIT_BIAS_RANGE[0] <= bias <= _LOGIT_BIAS_RANGE[1],
               "'logit_bias' values must be numbers in [-100, 100]", "logit_bias")
        ids.append(int(key))
        biases.append(float(bias))
    return tuple(ids), tuple(biases)


def _unsupported(body: dict) -> None:
    """Refuse what would otherwise be silently ignored: a client that asks
    for JSON output or a tool call must not get plain samples with a 200."""
    fmt = _get(body, "response_format", (dict,))
    _check(fmt is None or fmt.get("type") == "text", "only the 'text' response_format is supported", "response_format")
    _check(body.get("tool_choice") in (None, "none"), "'tool_choice' is not supported by this server", "tool_choice")
    _check(not body.get("functions"), "'functions' are not supported by this server", "functions")
    _check(body.get("function_call") in (None, "none"), "'function_call' is not supported by this server", "function_call")
    _only_default(body, _DEFAULT_FLAGS)


# Flags of vLLM's and SGLang's APIs that would change the output; only their
# defaults are accepted (anything else is refused, not silently ignored).
_DEFAULT_FLAGS = {"include_stop_str_in_output": False, "no_stop_trim": False, "skip_special_tokens": True,
                  "spaces_between_special_tokens": True}
_CHAT_DEFAULT_FLAGS = {"add_generation_prompt": True, "continue_final_message": False, "echo": False}
_GENERATE_UNSUPPORTED = ("regex", "json_schema", "ebnf", "structural_tag")


def _only_default(body: dict, defaults: dict[str, Any]) -> None:
    for name, default in defaults.items():
        value = body.get(name)
        _check(value is None or value is default, f"'{name}': only {str(default).lower()} is supported", name)


def _common(body: dict, prompts: list, params: SamplingParams, stop: tuple[str, ...],
            max_tokens_given: bool) -> GenerationInput:
    n = _get(body, "n", (int,), 1)
    _check(1 <= n <= 16, "'n' must be in [1, 16]", "n")
    _check(len(prompts) * n <= MAX_CALL_REQUESTS,
           f"at most {MAX_CALL_REQUESTS} completions a call (prompts x n); split the batch", "prompt")
    stream = bool(_get(body, "stream", (bool,), False))
    options = _get(body, "stream_options", (dict,), {})
    _check(stream or not options, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    room = _get(body, "bootstrap_room", (int,))
    _check(room is None or 0 <= room < 2**63, "'bootstrap_room' must be a 63-bit non-negative integer", "bootstrap_room")
    return GenerationInput(
        prompts=prompts,
        params=params,
        stop=stop,
        stream=stream,
        include_usage=bool(_get(options, "include_usage", (bool,), False)) if stream else False,
        n=n,
        model=_get(body, "model", (str,)),
        bootstrap_room=room,
        prefill_instance_id=_get(body, "prefill_instance_id", (str,)),
        return_timing=bool(_get(body, "return_timing", (bool,), False)),
        max_tokens_given=max_tokens_given,
    )


def parse_completion(body: dict) -> GenerationInput:
    prompt = body.get("prompt")
    prompts = _completion_prompts(prompt)
    params, max_given = _sampling(body, ("max_tokens",), 16)
    logprobs = _get(body, "logprobs", (int,))
    if logprobs is not None:
        _check(0 <= logprobs <= MAX_LOGPROBS, f"'logprobs' must be in [0, {MAX_LOGPROBS}]", "logprobs")
        params = replace(params, logprobs=True, top_logprobs=logprobs)
    _check(not _get(body, "echo", (bool,), False), "'echo' is not supported", "echo")
    _check(body.get("suffix") is None, "'suffix' is not supported", "suffix")
    best_of = _get(body, "best_of", (int,))
    _check(best_of is None or best_of == _get(body, "n", (int,), 1), "'best_of' other than 'n' is not supported", "best_of")
    _unsupported(body)
    return _common(body, prompts, params, _stop_strings(body.get("stop")), max_given)


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        _check(prompt != "", "'prompt' must not be empty", "prompt")
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if _all_ints(prompt):
            return [list(prompt)]
        if all(isinstance(x, str) and x for x in prompt):
            return list(prompt)
        if all(isinstance(x, list) and x and _all_ints(x) for x in prompt):
            return [list(x) for x in prompt]
    raise APIError(400, "'prompt' must be a non-empty string, list of strings, or list of token ids", "prompt")


def parse_chat(body: dict) -> GenerationInput:
    messages = body.get("messages")
    _check(isinstance(messages, list) and len(messages) > 0, "'messages' must be a non-empty list", "messages")
    clean = [_chat_message(m, i) for i, m in enumerate(messages)]
    _check(not body.get("tools"), "'tools' are not supported by this server", "tools")
    _check(body.get("chat_template") is None, "'chat_template' is not supported: the model's own is used", "chat_template")
    _only_default(body, _CHAT_DEFAULT_FLAGS)
    params, max_given = _sampling(body, ("max_completion_tokens", "max_tokens"), 4096)
    if _get(body, "logprobs", (bool,), False):
        top = _get(body, "top_logprobs", (int,), 0)
        _check(0 <= top <= MAX_LOGPROBS, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}]", "top_logprobs")
        params = replace(params, logprobs=True, top_logprobs=top)
    else:
        _check(body.get("top_logprobs") is None, "'top_logprobs' needs 'logprobs' to be true", "top_logprobs")
    _unsupported(body)
    return _common(body, [clean], params, _stop_strings(body.get("stop")), max_given)


def _chat_message(message: Any, index: int) -> dict:
    param = f"messages[{index}]"
    _check(isinstance(message, dict), "each message must be an object", param)
    role = message.get("role")
    roles = ("system", "user", "assistant", "tool", "developer")
    # Only a string is echoed back: the repr of any other value may be huge.
    _check(isinstance(role, str) and role in roles, f"invalid role {role!r}" if isinstance(role, str) else "'role' must be a string", f"{param}.role")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            _check(isinstance(part, dict) and part.get("type") == "text", "only text content parts are supported", f"{param}.content")
            _check(isinstance(part.get("text"), str), f"content part {j}: 'text' must be a string", f"{param}.content")
            parts.append(part["text"])
        content = "".join(parts)
    _check(isinstance(content, str) or (content is None and role == "assistant"), "'content' must be a string", f"{param}.content")
    return {"role": "system" if role == "developer" else role, "content": content or ""}


def parse_generate(body: dict) -> GenerationInput:
    text, ids = body.get("text"), body.get("input_ids")
    _check((text is None) != (ids is None), "exactly one of 'text' and 'input_ids' is required", "text")
    if text is not None:
        _check(isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text)),
               "'text' must be a string or a list of strings", "text")
    else:
        # Token ids, never text: a string here is the caller's mistake, not a prompt.
        _check(isinstance(ids, list) and set(map(type, ids)) <= {int, list},
               "'input_ids' must be a list of token ids or a list of such lists", "input_ids")
    prompts = _completion_prompts(text if text is not None else ids)
    sp = _get(body, "sampling_params", (dict,), {})
    for name in _GENERATE_UNSUPPORTED:
        _check(sp.get(name) is None, f"'{name}' (constrained decoding) is not supported by this server", name)
    _only_default(sp, _DEFAULT_FLAGS)
    if sp.get("n") is not None and body.get("n") is None:  # SGLang takes n in sampling_params
        body = {**body, "n": sp["n"]}
    params, max_given = _sampling(sp, ("max_new_tokens",), 128, "min_new_tokens")
    if _get(body, "return_logprob", (bool,), False):
        top = _get(body, "top_logprobs_num", (int,), 0)
        _check(0 <= top <= MAX_LOGPROBS, f"'top_logprobs_num' must be in [0, {MAX_LOGPROBS}]", "top_logprobs_num")
        params = replace(params, logprobs=True, top_logprobs=top)
    if sp.get("sampling_seed") is not None:
        params = replace(params, seed=_seed(sp, "sampling_seed"))
    return _common(body, prompts, params, _stop_strings(sp.get("stop")), max_given)
