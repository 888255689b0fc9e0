"""A request as the engine sees it: token ids, pages, progress, finish state.

Invariant: the KV of ``all_ids[:num_computed]`` is in ``pages``. A step feeds
``all_ids[num_computed:...]``; once ``num_computed == len(all_ids)`` the step's
last logits give the next token. Prefill feeds many tokens, decode feeds one,
a retracted request simply starts again from ``num_computed = 0``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.common.sampling_params import SamplingParams


@dataclass
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_s: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: int | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_sent: int = 0  # output tokens already reported to the front
    scheduled_s: float | None = None  # first forward step that included it
    first_token_s: float | None = None
    last_token_s: float | None = None
    room: int | None = None  # PD bootstrap room
    prefill_instance_id: str | None = None
    # Phases a PD role measured (seconds by phase name); the journey of the request.
    stages_s: dict[str, float] = field(default_factory=dict)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def ids_read_only(self) -> list[int]:
        """``all_ids`` without its copy while nothing was generated; not to be changed."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return self.seq_len - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def remaining_new_tokens(self) -> int:
        return max(self.params.max_new_tokens - len(self.output_ids), 0)
