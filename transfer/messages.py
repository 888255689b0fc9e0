"""Typed messages the transfer layer exchanges between agents."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.codec import CodecError, decode, message
from pdserve.common.kv_layout import KVLayout

NOTICE_CHUNK = "chunk"  # one chunk of a room has landed
NOTICE_ABORT = "abort"  # the sending side gave the room up


@message
@dataclass(frozen=True, kw_only=True)
class AgentInfo:
    """Published by every agent: how to reach it and what its pages look like."""

    name: str
    backend: str
    backend_metadata: bytes  # opaque to everyone but the backend
    base_ptr: int
    num_bytes: int
    device: str
    device_id: int
    layout: dict = field(default_factory=dict)  # KVLayout.to_dict()

    @property
    def kv_layout(self) -> KVLayout:
        return KVLayout.from_dict(self.layout)


@message
@dataclass(frozen=True, kw_only=True)
class RoomNotice:
    room: int
    kind: str  # NOTICE_CHUNK | NOTICE_ABORT
    sender: str
    chunk_index: int = 0
    is_last: bool = False
    reason: str = ""


@message
@dataclass(frozen=True, kw_only=True)
class RingOffer:
    """A prefill agent offers its decode peer a notice ring (``notice_ring``)."""

    sender: str
    path: str
    num_records: int


def decode_as(data: bytes, cls: type) -> object:
    """Decode and insist on the expected message type."""
    msg = decode(data)
    if not isinstance(msg, cls):
        raise CodecError(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg
