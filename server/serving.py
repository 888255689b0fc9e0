"""From a parsed API call to engine requests and back to text, for one instance.

Tokenizes (chat template included), checks token ids and lengths against the
model, fans a call out into one engine request per prompt and sample, and turns
each request's engine outputs into text deltas while recording metrics.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

from pdserve.common.errors import APIError
from pdserve.common.messages import GenerateRequest, TokenOutput
from pdserve.common.sampling_params import SamplingParams
from pdserve.server.engine_client import EngineClient, EngineUnavailable
from pdserve.server.metrics import ServerMetrics
from pdserve.server.protocol import GenerationInput
from pdserve.server.text_stream import ChoiceState, TextDelta, TextStream, apply_delta
from pdserve.server.tokenizer import (
    IncrementalDetokenizer,
    apply_chat_template,
    ids_decoder,
    max_token_bytes,
)

T = TypeVar("T")
ROOM_SPACE = 2**63
# Request preparation (JSON, chat template, tokenization) of a body up to this
# size runs on the event loop: milliseconds, less than a hop to a thread costs
# in latency under load. Larger bodies are prepared on the pool below.
INLINE_BODY_BYTES = 8 * 1024
# Threads that prepare large requests: HF fast tokenizers release the GIL, so
# they tokenize in parallel while the loop keeps answering.
NUM_PREPARE_THREADS = max(2, min(8, os.cpu_count() or 2))


def _sample_seed(seed: int, sample: int) -> int:
    """Seed of the ``sample``-th of n choices, kept in int64 (the engine pipe's width)."""
    return (seed + sample + 2**63) % 2**64 - 2**63


@dataclass(frozen=True)
class SubRequest:
    index: int
    rid: str
    input_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    room: int | None
    prefill_instance_id: str | None
    received_s: float = 0.0  # when the HTTP front got the call (monotonic)


@dataclass(frozen=True)
class ModelLimits:
    context_len: int
    vocab_size: int
    max_total_tokens: int
    num_sampled_tokens: int  # the logits' columns the sampler sees
    max_queued_requests: int | None = None  # the engine's --max-queued-requests (colocated)


def check_logit_bias(params: SamplingParams, num_sampled_tokens: int) -> None:
    """A biased id must be one the sampler sees: a column of the logits it is
    handed, which stop at the tokenizer's size (a model's vocabulary is often
    padded past it)."""
    if params.logit_bias_ids and max(params.logit_bias_ids) >= num_sampled_tokens:
        raise APIError(400, f"'logit_bias' token id {max(params.logit_bias_ids)} is outside the vocabulary "
                       f"[0, {num_sampled_tokens})", "logit_bias")


def _with_front(engine_phases_s: dict[str, float], received_s: float) -> dict[str, float]:
    """The engine's phases plus the front's own time: the call's time here so
    far (tokenizing, the pipe, detokenizing) less what the engine accounted for."""
    spent_s = time.monotonic() - received_s
    return {**engine_phases_s, "front": max(spent_s - sum(engine_phases_s.values()), 0.0)}


class Serving:
    def __init__(self, engine: EngineClient, tokenizer, limits: ModelLimits, metrics: ServerMetrics, allow_auto_truncate: bool, log_requests: bool):
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self.allow_auto_truncate = allow_auto_truncate
        self.log_requests = log_requests
        self._decode = ids_decoder(tokenizer)  # built once: it probes the tokenizer
        self._pool = ThreadPoolExecutor(NUM_PREPARE_THREADS, thread_name_prefix="prepare")
        # No token is longer than this, so text of more characters than the context
        # times it cannot fit: it is refused (or cut) before it is tokenized.
        self._max_text_chars = limits.context_len * max_token_bytes(tokenizer)

    async def off_loop(self, size_bytes: int, work: Callable[[], T]) -> T:
        """``work()``, on the pool when the request is large (see INLINE_BODY_BYTES).

        Tokenizing a prompt of megabytes takes seconds; on the event loop it
        would stall every other request and ``/health`` meanwhile.
        """
        if size_bytes <= INLINE_BODY_BYTES:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    # ---- request building --------------------------------------------------------
    def build(self, gen: GenerationInput, received_s: float | None = None) -> list[SubRequest]:
        check_logit_bias(gen.params, self.limits.num_sampled_tokens)
        base = uuid.uuid4().hex
        received_s = time.monotonic() if received_s is None else received_s
        subs = []
        for p_idx, prompt in enumerate(gen.prompts):
            ids, params = self._tokenize(prompt, gen.params, gen.max_tokens_given)
            for j in range(gen.n):
                index = p_idx * gen.n + j
                # Every sub-request needs its own room; both PD sides derive the same ones.
                room = None if gen.bootstrap_room is None else (gen.bootstrap_room + index) % ROOM_SPACE
                sub_params = params if params.seed is None or gen.n == 1 else replace(params, seed=_sample_seed(params.seed, j))
                subs.append(SubRequest(index, f"{base}-{index}", ids, sub_params, gen.stop, room, gen.prefill_instance_id, received_s))
        limit = self.limits.max_queued_requests
        if limit is not None and len(subs) > limit:
            # The engine counts each completion as a queued request: a call of
            # more is admitted only if its first ones start running before the
            # rest arrive, and a client would retry its 503 forever.
            # (Checked last, so that a prompt's own error is the answer first.)
            raise APIError(400, f"this call asks for {len(subs)} completions (prompts x n); the server queues "
                           f"at most {limit} (max_queued_requests)", "n")
        return subs

    def _bounded_text(self, text: str, param: str) -> str:
        """``text``, or its head when it holds more tokens than the context for sure.

        Tokenizing megabytes costs seconds of CPU (and holds the GIL for a while
        at the end); a text this long is refused at once, or with auto-truncation
        cut to a head that still holds twice the context, the only tokens kept.
        """
        if len(text) <= self._max_text_chars:
            return text
        self._refuse_unless_truncating(len(text), param)
        return text[: 2 * self._max_text_chars]

    def _bounded_chat(self, messages: list[dict]) -> list[dict]:
        """The same for a conversation: its template only adds to its contents."""
        num_chars = sum(len(m["content"]) for m in messages)
        if num_chars <= self._max_text_chars:
            return messages
        self._refuse_unless_truncating(num_chars, "messages")
        return [{**m, "content": m["content"][: 2 * self._max_text_chars]} for m in messages]

    def _refuse_unless_truncating(self, num_chars: int, param: str) -> None:
        if not self.allow_auto_truncate:
            raise APIError(400, f"This model's maximum context length is {self.limits.context_len} tokens. However, "
                                f"a prompt of {num_chars} characters holds more tokens than that.",
                           param, "context_length_exceeded")

    def _tokenize(self, prompt, params: SamplingParams, max_given: bool = True) -> tuple[list[int], SamplingParams]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(self._bounded_text(prompt, "prompt"))
        elif prompt and isinstance(prompt[0], dict):
            prompt = self._bounded_chat(prompt)
            try:
                ids = apply_chat_template(self.tokenizer, prompt)
            except Exception as exc:  # template errors are the caller's input problem
                raise APIError(400, f"chat template failed: {exc}", "messages") from exc
        else:
            ids = list(prompt)
            vocab = self.limits.vocab_size
            if ids and not 0 <= min(ids) <= max(ids) < vocab:  # (C speed; the loop below names the culprit)
                bad = next(t for t in ids if not 0 <= t < vocab)
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        return self._fit_context(ids, params, max_given)

    def _fit_context(self, ids: list[int], params: SamplingParams,
                     max_given: bool = True) -> tuple[list[int], SamplingParams]:
        """``max_given=False`` (the call left the length to the server): a prompt
        that fits gets what the context leaves rather than a 400."""
        ctx = self.limits.context_len
        if not ids:
            raise APIError(400, "the prompt is empty after tokenization", "prompt")
        if len(ids) + params.max_new_tokens > ctx:
            fits = len(ids) < ctx
            if not self.allow_auto_truncate and (max_given or not fits):
                raise APIError(
                    400,
                    f"This model's maximum context length is {ctx} tokens. However, you requested "
                    f"{len(ids) + params.max_new_tokens} tokens ({len(ids)} in the prompt, "
                    f"{params.max_new_tokens} for the completion).",
                    "max_tokens" if fits else "prompt",
                    "context_length_exceeded",
                )
            if fits:
                # The prompt fits: keep all of it and shorten the answer instead.
                max_new = ctx - len(ids)
            else:
                # SGLang keeps the head of an over-long prompt.
                max_new = min(params.max_new_tokens, max(ctx - 1, 1))
                ids = ids[: max(ctx - max_new, 1)]
            params = replace(params, max_new_tokens=max_new, min_new_tokens=min(params.min_new_tokens, max_new))
        if len(ids) + 1 > self.limits.max_total_tokens:
            raise APIError(400, f"prompt of {len(ids)} tokens does not fit the KV pool ({self.limits.max_total_tokens} tokens)", "prompt")
        return ids, params

    # ---- running ---------------------------------------------------------------
    async def stream(self, sub: SubRequest, state: ChoiceState) -> AsyncIterator[TextDelta]:
        """Yield text deltas of one engine request; raises APIError on engine errors.

        It reads the request's mailbox itself (one generator between the engine
        pipe and the HTTP response, not three): this runs once per streamed token.
        """
        text = TextStream(IncrementalDetokenizer(self.tokenizer, decode=self._decode), sub.stop)
        req = GenerateRequest(rid=sub.rid, input_ids=sub.input_ids, params=sub.params, bootstrap_room=sub.room, prefill_instance_id=sub.prefill_instance_id)
        timer = self.metrics.request_timer(len(sub.input_ids))
        finished = False
        try:
            box = self.engine.open(req)
            while not finished:
                updates = await box.take()
                last = updates[-1]
                if isinstance(last, TokenOutput) and last.error:
                    finished = True
                    timer.abort()
                    raise APIError(last.error_status or 500, last.error, code=last.error_code)
                delta = text.feed(updates)
                apply_delta(state, delta, updates)
                if state.timing is not None and "front" not in state.timing:
                    state.timing = _with_front(state.timing, sub.received_s)
                timer.tokens(len(delta.token_ids), state.cached_tokens)
                # A stop string may end the stream before the engine does; then
                # leaving aborts the engine request (below).
                finished = isinstance(last, TokenOutput) and last.finish_reason is not None
                yield delta
                if delta.finish_reason is not None:
                    break
        except EngineUnavailable as exc:
            raise APIError(503, str(exc)) from exc
        finally:
            self.engine.close(req.rid, abort=not finished)
            timer.finish(state.finish_reason, state.timing)

    async def collect(self, sub: SubRequest) -> ChoiceState:
        state = ChoiceState(sub.index)
        async for _ in self.stream(sub, state):
            pass
        return state

    async def collect_all(self, subs: list[SubRequest]) -> list[ChoiceState]:
        tasks = [asyncio.ensure_future(self.collect(s)) for s in subs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # One failed choice fails the call: stop (and abort) its siblings too.
            for task in tasks:
                task.cancel()

    async def merged(self, subs: list[SubRequest], states: list[ChoiceState]) -> AsyncIterator[tuple[int, TextDelta]]:
        """Interleave the deltas of several sub-requests as they come (one is ``stream`` itself)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for delta in self.stream(subs[i], states[i]):
                    await queue.put((i, delta, None))
            except Exception as exc:  # forwarded to the consumer below
                await queue.put((i, None, exc))
            await queue.put((i, None, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(subs))]
        try:
            remaining = len(subs)
            while remaining:
                i, delta, exc = await queue.get()
                if exc is not None:
                    raise exc
                if delta is None:
                    remaining -= 1
                    continue
                yield i, delta
        finally:
            for t in tasks:
                t.cancel()


