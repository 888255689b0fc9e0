"""Messages of the PD control channel between a decode and a prefill instance.

The data itself moves over the transfer layer; these say which pages to write,
hand over the first token, and end rooms early. Lifecycle of a room:

0. P -> D ``PeerHello`` first on every control connection: P's epoch. D
   compares it with the epoch it found at the bootstrap service; another one
   means P restarted (same address, new process), so every room of the old
   P is over and its pages can be reused at once.
1. D -> P ``KVPagesRequest``: D reserved ``dst_pages`` for the prompt. It names
   the epoch of the P it means; a restarted P refuses the room.
2. P prefills, writes the pages, then P -> D ``PrefillDone`` with the first token.
   Until its last pages are posted, P names the room in ``RoomsInPrefill``
   every quarter of the rooms' timeout: the room's deadline starts over on
   both sides, so a prefill backlog longer than the timeout fails no room,
   while a P whose engine stops working still fails its rooms in time.
3. Either side may send ``RoomAbort`` at any time; the room then ends on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.codec import message


@message
@dataclass(frozen=True, kw_only=True)
class PeerHello:
    instance_id: str
    epoch: str


@message
@dataclass(frozen=True, kw_only=True)
class KVPagesRequest:
    room: int
    prefill_epoch: str  # the incarnation of P this room was opened with
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
class RoomsInPrefill:
    rooms: list[int]  # queued or prefilling on P, their last pages not posted yet


@message
@dataclass(frozen=True, kw_only=True)
class RoomAbort:
    room: int
    reason: str
