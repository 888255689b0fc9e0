"""Response bodies in the shapes OpenAI and SGLang clients parse."""

from __future__ import annotations

import time

import orjson
from pdserve.server.text_stream import ChoiceState, TextDelta
from pdserve.server.tokenizer import token_bytes


def usage(choices: list[ChoiceState], n: int) -> dict:
    """Prompt tokens count once per prompt (choice index = prompt * n + sample)."""
    firsts = [c for c in choices if c.index % n == 0]
    prompt = sum(c.prompt_tokens for c in firsts)
    completion = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)},
    }


def _token_str(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, token_ids, logprobs, top_logprobs, start: int = 0) -> dict | None:
    """OpenAI's completion logprobs; ``text_offset`` counts from ``start`` (a
    stream's chunk: the characters of the tokens before it)."""
    if logprobs is None or not token_ids and not logprobs:
        return None
    tokens = [_token_str(tokenizer, t) for t in token_ids]
    tops = [{_token_str(tokenizer, int(t)): lp for t, lp in entry} for entry in (top_logprobs or [[] for _ in tokens])]
    offsets, pos = [], start
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids, logprobs, top_logprobs) -> dict | None:
    if logprobs is None:
        return None
    content = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
        tops = [_chat_token(tokenizer, int(tt), tlp) for tt, tlp in (top_logprobs[i] if top_logprobs else [])]
        content.append({**_chat_token(tokenizer, t, lp), "top_logprobs": tops})
    return {"content": content}


def _chat_token(tokenizer, token_id: int, logprob: float) -> dict:
    return {"token": _token_str(tokenizer, token_id), "logprob": logprob, "bytes": list(token_bytes(tokenizer, token_id))}


def completion_body(rid: str, model: str, choices: list[ChoiceState], tokenizer, want_lp: bool, n: int) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(tokenizer, c.token_ids, c.logprobs, c.top_logprobs) if want_lp else None,
                "finish_reason": c.finish_reason,
                "matched_stop": c.matched_stop,
            }
            for c in choices
        ],
        "usage": usage(choices, n),
    }


def chat_body(rid: str, model: str, choices: list[ChoiceState], tokenizer, want_lp: bool, n: int) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(tokenizer, c.token_ids, c.logprobs, c.top_logprobs) if want_lp else None,
                "finish_reason": c.finish_reason,
                "matched_stop": c.matched_stop,
            }
            for c in choices
        ],
        "usage": usage(choices, n),
    }


def completion_chunk(rid: str, model: str, index: int, delta: TextDelta, tokenizer, want_lp: bool,
                     offset: int = 0) -> dict:
    lp = completion_logprobs(tokenizer, delta.token_ids, delta.logprobs, delta.top_logprobs, offset) if want_lp else None
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": delta.text, "logprobs": lp, "finish_reason": delta.finish_reason}],
    }


def chat_chunk(rid: str, model: str, index: int, delta: TextDelta | None, tokenizer, want_lp: bool) -> dict:
    if delta is None:  # the opening chunk announces the role
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    else:
        lp = chat_logprobs(tokenizer, delta.token_ids, delta.logprobs, delta.top_logprobs) if want_lp else None
        choice = {"index": index, "delta": {"content": delta.text}, "logprobs": lp, "finish_reason": delta.finish_reason}
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": [choice]}


class TextChunks:
    """SSE events of one streamed choice whose chunks carry text and nothing else.

    Most chunks of a stream are exactly that; their bytes are one template made
    when the stream starts with the text's JSON string in the middle, instead of
    a dict per token serialized whole.
    """

    def __init__(self, rid: str, model: str, index: int, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = orjson.dumps({"id": rid, "object": obj, "created": int(time.time()), "model": model})[:-1]
        field = b'"delta":{"content":' if chat else b'"text":'
        self._prefix = b"data: " + head + b',"choices":[{"index":%d,' % index + field
        self._suffix = (b"}" if chat else b"") + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def event(self, text: str) -> bytes:
        return self._prefix + orjson.dumps(text) + self._suffix


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or a literal such as ``[DONE]``)."""
    payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
    return b"data: " + payload + b"\n\n"


def usage_chunk(rid: str, model: str, obj: str, choices: list[ChoiceState], n: int) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage(choices, n)}


def generate_body(rid: str, c: ChoiceState, e2e_s: float, several: bool = False) -> dict:
    """SGLang's /generate answer (or stream chunk) of one choice. Of a call with
    several (a batch, or n > 1), each carries its ``index`` and its own id."""
    finish = None
    if c.finish_reason is not None:
        finish = {"type": c.finish_reason, "matched": c.matched_stop}
        if c.finish_reason == "length":
            finish["length"] = len(c.token_ids)
    meta = {
        "id": f"{rid}-{c.index}" if several else rid,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": len(c.token_ids),
        "cached_tokens": c.cached_tokens,
        "finish_reason": finish,
        "e2e_latency": e2e_s,
    }
    if c.logprobs:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids)]
        meta["output_top_logprobs"] = [[[lp, int(t), None] for t, lp in top] for top in c.top_logprobs]
    body = {"text": c.text, "output_ids": list(c.token_ids), "meta_info": meta}
    if several:
        body["index"] = c.index
    return body
