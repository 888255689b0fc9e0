"""Typed messages between an instance's HTTP front and its engine process."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.codec import message
from pdserve.common.sampling_params import SamplingParams


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


@message
@dataclass(frozen=True, kw_only=True)
class ControlRequest:
    """Ask the engine something: ``kind`` is "stats" or "flush_cache"."""

    req_id: int
    kind: str


@message
@dataclass(frozen=True, kw_only=True)
class ControlResponse:
    req_id: int
    ok: bool
    data: dict = field(default_factory=dict)
    message: str = ""


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
