"""Typed messages between an instance's HTTP front and its engine process."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pdserve.common.codec import message
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.stats import StatsSnapshot


@message
@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    bootstrap_room: int | None = None  # PD: the room shared by the prefill and decode side
    prefill_instance_id: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class AbortRequest:
    rid: str
    reason: str = "abort"


class ControlKind(str, Enum):
    """What a control request asks the engine."""

    STATS = "stats"  # answered with its EngineStats
    FLUSH_CACHE = "flush_cache"  # empty the prefix cache (refused while requests run)


@message
@dataclass(frozen=True, kw_only=True)
class ControlRequest:
    req_id: int
    kind: ControlKind


@message
@dataclass(frozen=True, kw_only=True)
class KVPoolStats:
    page_size: int  # tokens per page
    total_pages: int
    free_pages: int
    parked_pages: int  # free once the decode step in flight ends
    cached_pages: int  # held by the prefix cache alone
    used_pages: int  # held by live requests and by the role (rooms in flight)
    bytes_per_page: int  # one page across every layer's K and V: what a PD transfer moves per page


@message
@dataclass(frozen=True, kw_only=True)
class RoleStats:
    """What a PD role adds to its engine's stats. The room counts name where
    its rooms wait; a role leaves out (None) those of the other role."""

    metrics: StatsSnapshot  # its KV transfer counters and queue gauges, exported by the front
    instance_id: str
    num_transferring_rooms: int
    num_transfer_peers: int  # peers loaded in its transfer agent
    num_transfer_rooms: int  # rooms open in its transfer agent
    # prefill
    num_bootstrapping_rooms: int | None = None  # waiting for the request or for D's page list
    num_prefill_rooms: int | None = None  # prefilling or transferring
    num_draining_rooms: int | None = None  # ended early, writes may still be in flight
    # decode
    num_prealloc_reqs: int | None = None  # waiting for pages to be reserved
    num_quarantined_rooms: int | None = None  # ended early, pages wait until no write can land

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@message
@dataclass(frozen=True, kw_only=True)
class EngineStats:
    """The engine's answer to a stats request: its load, its pool, and its role's rooms."""

    pid: int
    rank_pids: list[int]  # every tensor-parallel rank's process, rank 0 first
    num_running_reqs: int
    num_queued_reqs: int
    num_generated_tokens: int
    num_retracted_reqs: int
    token_usage: float  # fraction of KV pages in use
    kv_pool: KVPoolStats
    role: RoleStats | None = None  # PD roles only

    def to_json(self) -> dict[str, Any]:
        """As ``/get_server_info`` shows it: the role's fields at the top level."""
        data = dataclasses.asdict(self)
        del data["role"]
        return {**data, **(self.role.to_json() if self.role is not None else {})}


@message
@dataclass(frozen=True, kw_only=True)
class ControlResponse:
    req_id: int
    ok: bool
    stats: EngineStats | None = None  # the answer to ``ControlKind.STATS``
    message: str = ""  # why the request was refused


@message
@dataclass(frozen=True, kw_only=True)
class TokenOutput:
    rid: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[list[float]]] | None = None  # per token: [[token_id, logprob], ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: int | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    error_status: int | None = None  # HTTP status the front answers with
    error_code: str | None = None  # the error object's machine-readable ``code`` (default: the status)
    # On a request's last output: seconds spent in each phase in the engine
    # (and, on a decode instance, those the prefill instance reported).
    timing: dict[str, float] | None = None


@message
@dataclass(frozen=True, kw_only=True)
class TokenBatch:
    """One engine step's news for the front.

    Most news is only "these requests have new tokens": those travel as two
    columns, ``rids[i]`` got ``token_ids[i]``, which msgpack packs at C speed
    (no object per token on either side). Everything else (a first output with
    its prompt counts, logprobs, a finish, an error) is a full ``TokenOutput``;
    a request's full output precedes its plain tokens of the same batch.
    """

    outputs: list[TokenOutput] = field(default_factory=list)
    rids: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)


@message
@dataclass(frozen=True, kw_only=True)
class EngineReady:
    """The engine loaded its model and serves; what the front needs to know of it."""

    context_len: int  # longest prompt + output, in tokens
    vocab_size: int
    max_total_num_tokens: int  # KV pool size
    max_running_requests: int
    page_size: int
    dtype: str
    device: str
    attention_backend: str
    instance_id: str | None = None  # PD roles: the id registered at the bootstrap service


@message
@dataclass(frozen=True, kw_only=True)
class EngineFailed:
    error: str
