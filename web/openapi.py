"""OpenAPI descriptions of the generation request bodies (instance and router alike).

The handlers read raw bodies (``server/protocol.py`` validates them), so FastAPI
cannot infer their shape; these JSON schemas put it into ``/openapi.json``, for
clients and for schema-driven fuzzing. They describe the accepted fields and
ranges; anything else in a body is ignored or refused with a 400 by the parser.
"""

from __future__ import annotations

from typing import Any

_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]}
_SAMPLING = {
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer"},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 2},
    "seed": {"type": "integer"},
    "stop": _STOP,
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "ignore_eos": {"type": "boolean"},
}
_COMMON = {
    "model": {"type": "string"},
    "n": {"type": "integer", "minimum": 1, "maximum": 16},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool", "developer"]},
        "content": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}},
        ]},
    },
}

COMPLETION = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        **_COMMON, **_SAMPLING,
        "prompt": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            _TOKEN_IDS,
            {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
        ]},
        "max_tokens": {"type": "integer", "minimum": 1},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    },
}
CHAT = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        **_COMMON, **_SAMPLING,
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    },
}
GENERATE = {
    "type": "object",
    "properties": {
        "text": {"oneOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]},
        "input_ids": {"oneOf": [_TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]},
        "sampling_params": {"type": "object", "properties": {
            **_SAMPLING, "max_new_tokens": {"type": "integer", "minimum": 1}, "sampling_seed": {"type": "integer"}}},
        "stream": {"type": "boolean"},
        "return_logprob": {"type": "boolean"},
        "top_logprobs_num": {"type": "integer", "minimum": 0, "maximum": 20},
    },
}
BODY_SCHEMAS = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT, "/generate": GENERATE}


def request_body(path: str) -> dict[str, Any]:
    """``openapi_extra`` of a generation route: its JSON request body."""
    schema = BODY_SCHEMAS[path]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
