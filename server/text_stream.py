"""Turns one request's engine outputs into text, cutting exactly at stop strings.

Text that could still become the start of a stop string is held back, so a
streamed answer never shows part of a stop string and streamed and
non-streamed answers are the same text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.messages import TokenOutput
from pdserve.server.engine_client import Update
from pdserve.server.tokenizer import IncrementalDetokenizer


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[list[float]]] | None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


@dataclass
class ChoiceState:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    # The engine's phases once finished, then the front's own (``Serving.stream``).
    timing: dict[str, float] | None = None


class TextStream:
    def __init__(self, detokenizer: IncrementalDetokenizer, stop: tuple[str, ...]):
        self.detok = detokenizer
        self.stop = stop
        self._text = ""
        self._sent = 0

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _find_stop(self) -> tuple[int, str] | None:
        start = max(0, self._sent - max((len(s) for s in self.stop), default=0))
        hits = [(i, s) for s in self.stop if (i := self._text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def feed(self, updates: list[Update]) -> TextDelta:
        """Consume the engine's updates (one or several steps); a stop-string hit ends the stream early."""
        delta = TextDelta("", [], None, None)
        for update in updates:
            out = update if isinstance(update, TokenOutput) else None
            ids = update if out is None else out.token_ids
            if out is not None and out.logprobs is not None and delta.logprobs is None:
                delta.logprobs, delta.top_logprobs = [], []
            for i, token in enumerate(ids):
                self._text += self.detok.add(token)
                delta.token_ids.append(token)
                if delta.logprobs is not None and out is not None:
                    delta.logprobs.append(out.logprobs[i])
                    delta.top_logprobs.append(out.top_logprobs[i] if out.top_logprobs else [])
                if self.stop and self._stopped(delta, out is not None and out.finish_reason is not None and i == len(ids) - 1):
                    return delta
            if out is not None and out.finish_reason is not None:
                self._text += self.detok.flush()
                if self.stop and self._stopped(delta, False):
                    return delta
                delta.finish_reason, delta.matched_stop = out.finish_reason, out.matched_stop
                delta.text = self._take(len(self._text))
                return delta
        delta.text = self._take(len(self._text) - self._held_back())
        return delta

    def _stopped(self, delta: TextDelta, flush: bool) -> bool:
        """Cut at the first stop string, if one is complete now."""
        if flush:
            self._text += self.detok.flush()
        hit = self._find_stop()
        if hit is None:
            return False
        self._text = self._text[: hit[0]]
        delta.text = self._take(len(self._text))
        delta.finish_reason, delta.matched_stop = "stop", hit[1]
        return True

    def _take(self, end: int) -> str:
        chunk = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return chunk


def apply_delta(state: ChoiceState, delta: TextDelta, updates: list[Update]) -> None:
    state.text += delta.text
    state.token_ids += delta.token_ids
    if delta.logprobs is not None:
        state.logprobs += delta.logprobs
        state.top_logprobs += delta.top_logprobs or []
    for update in updates:
        if isinstance(update, TokenOutput):
            state.prompt_tokens = update.prompt_tokens or state.prompt_tokens
            state.cached_tokens = update.cached_tokens or state.cached_tokens
            if update.timing is not None:
                state.timing = update.timing
    if delta.finish_reason is not None:
        state.finish_reason, state.matched_stop = delta.finish_reason, delta.matched_stop
