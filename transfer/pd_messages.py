"""Messages of the PD control channel between a decode and a prefill instance.

The data itself moves over the transfer layer; these say which pages to write,
hand over the first token, and end rooms early. Lifecycle of a room:

1. D -> P ``KVPagesRequest``: D reserved ``dst_pages`` for the prompt.
2. P prefills, writes the pages, then P -> D ``PrefillDone`` with the first token.
3. Either side may send ``RoomAbort`` at any time; the room then ends on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.codec import message


@message
@dataclass(frozen=True, kw_only=True)
class KVPagesRequest:
    room: int
    decode_instance_id: str
    peer_info: bytes  # D's transfer-agent metadata (idempotent to load)
    dst_pages: list[int]
    num_prompt_tokens: int


@message
@dataclass(frozen=True, kw_only=True)
class PrefillDone:
    room: int
    first_token_id: int
    logprob: float | None = None
    top_logprobs: list[list[float]] | None = None  # [[token_id, logprob], ...]
    cached_tokens: int = 0
    # Seconds the room spent in each phase on P (prefill_bootstrap, prefill_queue,
    # prefill): D adds them to the request's journey.
    stages_s: dict[str, float] = field(default_factory=dict)


@message
@dataclass(frozen=True, kw_only=True)
class RoomAbort:
    room: int
    reason: str
