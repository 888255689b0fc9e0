"""Request formats of the benchmark client, registered by backend name.

- ``openai``: ``POST /v1/completions``; token-id prompts go in ``prompt`` as a list
  of ints, which the OpenAI API allows.
- ``openai-chat``: ``POST /v1/chat/completions`` with one user message.
- ``pdserve``: the native ``POST /generate`` (SGLang's format). Every SSE chunk is
  ``{"text": ..., "output_ids": ..., "meta_info": {...}}`` with the text so far,
  and ``meta_info.completion_tokens`` the number of tokens so far.

A backend builds the JSON body and makes a per-request parser that turns each SSE
``data:`` payload into a ``ChunkUpdate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.benchmarks.datasets import BenchRequest
from pdserve.common.registry import Registry


@dataclass(frozen=True)
class RequestOptions:
    model: str | None
    ignore_eos: bool = False
    temperature: float = 0.0
    return_timing: bool = False  # ask for each request's journey (``timing``)


@dataclass(frozen=True)
class ChunkUpdate:
    """What one stream chunk says; ``None`` where the chunk is silent about it."""

    text: str = ""  # new text in this chunk
    tokens_so_far: int | None = None  # cumulative output tokens, when the server says
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    timing: dict[str, Any] | None = None  # the request's journey, on the chunk that carries it


class StreamParser:
    def feed(self, payload: dict[str, Any]) -> ChunkUpdate:
        raise NotImplementedError


@dataclass(frozen=True)
class Backend:
    name: str
    path: str
    build_body: Callable[[BenchRequest, RequestOptions], dict[str, Any]]
    new_parser: Callable[[], StreamParser]


BACKENDS: Registry[Backend] = Registry("benchmark backend")


def register_backend(name: str, path: str, new_parser: Callable[[], StreamParser]) -> Callable:
    def wrap(build_body: Callable[[BenchRequest, RequestOptions], dict[str, Any]]) -> Callable:
        BACKENDS.add(name, Backend(name, path, build_body, new_parser))
        return build_body

    return wrap


def _error_text(payload: dict[str, Any]) -> str | None:
    error = payload.get("error")
    if error is None:
        return None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _usage(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = payload.get("usage") or {}
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


class CompletionsParser(StreamParser):
    """OpenAI completion chunks; a chunk's ``usage`` (final, or per chunk) gives counts."""

    def feed(self, payload: dict[str, Any]) -> ChunkUpdate:
        error = _error_text(payload)
        if error is not None:
            return ChunkUpdate(error=error)
        choices = payload.get("choices") or [{}]
        text = self._text(choices[0]) or ""
        prompt_tokens, completion_tokens = _usage(payload)
        tokens_so_far = completion_tokens if text and completion_tokens is not None else None
        return ChunkUpdate(text, tokens_so_far, prompt_tokens, completion_tokens, timing=payload.get("timing"))

    def _text(self, choice: dict[str, Any]) -> str | None:
        return choice.get("text")


class ChatParser(CompletionsParser):
    def _text(self, choice: dict[str, Any]) -> str | None:
        delta = choice.get("delta") or {}
        return (delta.get("reasoning_content") or "") + (delta.get("content") or "")


class GenerateParser(StreamParser):
    """Native ``/generate`` chunks carry the whole text so far; the new part is the tail."""

    def __init__(self) -> None:
        self._text_so_far = ""

    def feed(self, payload: dict[str, Any]) -> ChunkUpdate:
        error = _error_text(payload)
        if error is not None:
            return ChunkUpdate(error=error)
        text = str(payload.get("text") or "")
        new_text = text[len(self._text_so_far):] if text.startswith(self._text_so_far) else text
        self._text_so_far = text
        meta = payload.get("meta_info") or {}
        completion = meta.get("completion_tokens")
        return ChunkUpdate(new_text, completion, meta.get("prompt_tokens"), completion, timing=meta.get("timing"))


def _openai_common(req: BenchRequest, opts: RequestOptions) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": req.output_len,
        "temperature": opts.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if opts.model is not None:
        body["model"] = opts.model
    if opts.ignore_eos:
        body["ignore_eos"] = True
    if opts.return_timing:
        body["return_timing"] = True
    return body


@register_backend("openai", "/v1/completions", CompletionsParser)
def _completions_body(req: BenchRequest, opts: RequestOptions) -> dict[str, Any]:
    return {"prompt": req.prompt, **_openai_common(req, opts)}


@register_backend("openai-chat", "/v1/chat/completions", ChatParser)
def _chat_body(req: BenchRequest, opts: RequestOptions) -> dict[str, Any]:
    if not isinstance(req.prompt, str):
        raise ValueError("--backend openai-chat sends text: use --dataset random, not random-ids")
    return {"messages": [{"role": "user", "content": req.prompt}], **_openai_common(req, opts)}


@register_backend("pdserve", "/generate", GenerateParser)
def _generate_body(req: BenchRequest, opts: RequestOptions) -> dict[str, Any]:
    sampling = {"max_new_tokens": req.output_len, "temperature": opts.temperature}
    if opts.ignore_eos:
        sampling["ignore_eos"] = True
    key = "text" if isinstance(req.prompt, str) else "input_ids"
    body: dict[str, Any] = {key: req.prompt, "sampling_params": sampling, "stream": True}
    if opts.model is not None:
        body["model"] = opts.model
    if opts.return_timing:
        body["return_timing"] = True
    return body
