"""The msgpack codec: every engine message survives the pipe unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import pytest
from pdserve.common import codec
from pdserve.common.messages import (
    AbortRequest,
    ControlKind,
    ControlRequest,
    ControlResponse,
    EngineFailed,
    EngineReady,
    EngineStats,
    GenerateRequest,
    KVPoolStats,
    RoleStats,
    TokenBatch,
    TokenOutput,
)
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.stats import StatsBook

PARAMS = SamplingParams(
    max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.1,
    frequency_penalty=-0.2, repetition_penalty=1.1, stop_token_ids=(3, 9), ignore_eos=True, seed=-5,
    logprobs=True, top_logprobs=2,
)
POOL = KVPoolStats(page_size=16, total_pages=64, free_pages=60, parked_pages=1, cached_pages=2, used_pages=1,
                   bytes_per_page=4096)


def _book() -> StatsBook:
    book = StatsBook()
    book.counter("kv_transfers", "rooms")
    book.histogram("kv_transfer_latency_seconds", "latency", (0.1, 1.0))
    book.observe("kv_transfer_latency_seconds", 0.5)
    return book


ROLE = RoleStats(metrics=_book().snapshot(), instance_id="d-1", num_transferring_rooms=1, num_transfer_peers=1,
                 num_transfer_rooms=1, num_prealloc_reqs=0, num_quarantined_rooms=0)
STATS = EngineStats(pid=12, rank_pids=[12], num_running_reqs=1, num_queued_reqs=0, num_generated_tokens=9,
                    num_retracted_reqs=0, token_usage=0.25, kv_pool=POOL, role=ROLE)
MESSAGES = [
    GenerateRequest(rid="rid-1", input_ids=[0, 5, 999], params=PARAMS, bootstrap_room=2**63 - 1, prefill_instance_id="p-1"),
    GenerateRequest(rid="rid-2", input_ids=[1], params=SamplingParams()),
    AbortRequest(rid="rid-1"),
    ControlRequest(req_id=3, kind=ControlKind.STATS),
    ControlResponse(req_id=3, ok=True, stats=STATS, message=""),
    ControlResponse(req_id=4, ok=False, message="cannot flush the cache while requests are running"),
    TokenOutput(rid="rid-1", token_ids=[4, 5], logprobs=[-0.5, -1.25], top_logprobs=[[[4, -0.5], [6, -2.0]], [[5, -1.25]]], finish_reason="stop", matched_stop=5, prompt_tokens=3, cached_tokens=2),
    TokenOutput(rid="rid-2", token_ids=[], finish_reason="abort", error="too many queued requests", error_status=503),
    TokenBatch(outputs=[TokenOutput(rid="a", token_ids=[1]), TokenOutput(rid="b", token_ids=[2], finish_reason="length")]),
    TokenBatch(outputs=[], rids=["a", "b"], token_ids=[[1], [2, 3]]),
    EngineReady(context_len=2048, vocab_size=320, max_total_num_tokens=4096, max_running_requests=64, page_size=16,
                dtype="float32", device="cpu", attention_backend="torch", instance_id="p-1"),
    EngineFailed(error="ValueError: boom"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    back = codec.decode(codec.encode(msg))
    assert back == msg and type(back) is type(msg)


def test_tuples_come_back_as_tuples() -> None:
    back = codec.decode(codec.encode(MESSAGES[0]))
    assert isinstance(back.params, SamplingParams) and back.params.stop_token_ids == (3, 9)
    assert hash(back.params) == hash(PARAMS)  # frozen and hashable again


def test_enums_come_back_as_enums() -> None:
    back = codec.decode(codec.encode(ControlRequest(req_id=1, kind=ControlKind.FLUSH_CACHE)))
    assert back.kind is ControlKind.FLUSH_CACHE
    with pytest.raises(codec.CodecError, match="ControlRequest"):
        codec.decode(msgpack.packb({"t": "ControlRequest", "f": {"req_id": 1, "kind": "reboot"}}))


def test_engine_stats_json_puts_the_role_fields_at_the_top_level() -> None:
    data = STATS.to_json()
    assert data["kv_pool"]["used_pages"] == 1 and data["pid"] == 12 and "role" not in data
    assert data["num_prealloc_reqs"] == 0 and "num_draining_rooms" not in data  # the other role's counts
    assert data["metrics"]["histograms"]["kv_transfer_latency_seconds"] == {"buckets": [0.1, 1.0], "counts": [0, 1, 0],
                                                                            "sum": 0.5}
    assert "metrics" not in EngineStats(**{**STATS.__dict__, "role": None}).to_json()


def test_plain_data_passes_through() -> None:
    data = {"a": [1, 2.5, None, "x"], "b": {"c": True}}
    assert codec.decode(codec.encode(data)) == data


def test_unknown_type_is_an_error() -> None:
    raw = msgpack.packb({"t": "NoSuchMessage", "f": {}})
    with pytest.raises(codec.CodecError):
        codec.decode(raw)


def test_garbage_is_an_error() -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(b"\xc1")


def test_unknown_fields_are_ignored_missing_ones_fail() -> None:
    newer = msgpack.packb({"t": "AbortRequest", "f": {"rid": "r", "reason": "abort", "added_later": 1}})
    assert codec.decode(newer) == AbortRequest(rid="r")
    with pytest.raises(codec.CodecError):
        codec.decode(msgpack.packb({"t": "AbortRequest", "f": {}}))


def test_registering_a_second_class_of_the_same_name_fails() -> None:
    with pytest.raises(TypeError):

        @codec.message
        @dataclass(frozen=True)
        class AbortRequest:  # noqa: F811 - the clash is the point
            rid: str

    with pytest.raises(TypeError):
        codec.message(type("NotADataclass", (), {}))


def test_ints_wider_than_64_bits_do_not_encode() -> None:
    # Why the HTTP front bounds seeds and token ids before they reach the pipe.
    with pytest.raises(OverflowError):
        codec.encode(AbortRequest(rid="r", reason=2**64))
