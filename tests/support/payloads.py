"""Request bodies, prompts and SSE responses of the instance API."""

from __future__ import annotations

import json
import random

import httpx


def prompt_ids(length: int, seed: int, vocab_size: int = 1000, first_id: int = 4) -> list[int]:
    """Reproducible ordinary token ids (the tiny model's first ids are special)."""
    rng = random.Random(seed)
    return [rng.randrange(first_id, vocab_size) for _ in range(length)]


def generate_body(ids: list[int], max_new_tokens: int, **sampling: object) -> dict:
    """A greedy, EOS-ignoring /generate body unless ``sampling`` says otherwise."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True, **sampling}
    return {"input_ids": ids, "sampling_params": params}


def sse_events(resp: httpx.Response) -> list[dict]:
    """The JSON events of a finished SSE response, up to ``[DONE]`` (which must come)."""
    events = []
    for line in resp.text.splitlines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            return events
        events.append(json.loads(payload))
    raise AssertionError(f"stream ended without [DONE]: {resp.text[-500:]}")
