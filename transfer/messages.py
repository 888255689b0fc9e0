"""Typed messages the transfer layer exchanges between agents."""

from __future__ import annotations

from dataclasses import dataclass

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
    kv_layout: KVLayout


class RoomNews:
    """News about a room from the agent named ``sender``: what an agent routes
    to a room's sender or receiver (a notice, or a backend's landed data)."""

    room: int
    sender: str


@message
@dataclass(frozen=True, kw_only=True)
class RoomNotice(RoomNews):
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
