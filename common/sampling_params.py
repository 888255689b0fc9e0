"""Sampling parameters of one request: what the front parses and the engine samples with."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from pdserve.common.codec import message

_GREEDY_EPS = 1e-5


@message
@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_new_tokens: int = 16
    # Until this many tokens are out, EOS and stop_token_ids cannot be drawn
    # (vLLM's min_tokens, SGLang's min_new_tokens); stop strings still apply.
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary, as in SGLang's API
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    # OpenAI's logit_bias as two columns (token ids, and what is added to
    # their logits before sampling): flat tuples cross the engine pipe as they are.
    logit_bias_ids: tuple[int, ...] = ()
    logit_bias_values: tuple[float, ...] = ()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    @property
    def has_penalty(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @cached_property
    def argmax_only(self) -> bool:
        """Greedy, no penalty, no logprobs: the token is the logits' argmax and
        nothing else is computed. Decided once per request (the sampler asks
        every step); not a field, so never on the wire."""
        return (self.is_greedy and not self.has_penalty and not self.logprobs and not self.logit_bias_ids
                and not self.min_new_tokens)
