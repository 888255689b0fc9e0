"""Benchmark metric math on synthetic request records (no server)."""

from __future__ import annotations

import pytest
from pdserve.benchmarks.metrics import (
    RequestRecord,
    Slo,
    compute_metrics,
    inter_token_latencies_s,
    meets_slo,
    parse_slo,
    peak_concurrency,
    split_tokens,
    summarize_ms,
    time_per_output_token_s,
)


def _ok(index: int, start_s: float, ttft_s: float, gap_s: float, num_tokens: int, **kw: object) -> RequestRecord:
    """A successful request streaming one token per chunk, ``gap_s`` apart."""
    times = tuple(ttft_s + i * gap_s for i in range(num_tokens))
    return RequestRecord(
        index=index, success=True, start_s=start_s, e2e_s=times[-1], ttft_s=ttft_s,
        chunk_times_s=times, chunk_tokens=(1,) * num_tokens, prompt_tokens=10,
        output_tokens=num_tokens, **kw,  # type: ignore[arg-type]
    )


def _failed(index: int, start_s: float, e2e_s: float) -> RequestRecord:
    return RequestRecord(index=index, success=False, start_s=start_s, e2e_s=e2e_s, error="HTTP 500")


def test_split_tokens_spreads_total_over_chunks_in_proportion() -> None:
    assert split_tokens(9, [1, 1, 1]) == [3, 3, 3]
    assert split_tokens(10, [1, 1, 1, 1]) == [3, 3, 2, 2]  # largest remainder, stable order
    assert split_tokens(7, [5, 1, 1]) == [5, 1, 1]
    assert sum(split_tokens(101, [3, 0, 7, 2])) == 101
    assert min(split_tokens(101, [3, 0, 7, 2])) >= 1
    assert split_tokens(2, [1, 1, 1]) == [1, 1, 1]  # fewer tokens than chunks: one each
    assert split_tokens(5, []) == []


def test_multi_token_chunk_gap_is_split_evenly() -> None:
    # Chunks at 0.2 s (2 tokens), 0.3 s (4 tokens), 0.32 s (1 token).
    itls = inter_token_latencies_s([0.2, 0.3, 0.32], [2, 4, 1])
    assert itls == pytest.approx([0.025] * 4 + [0.02])
    # Tokens of the first chunk contribute no ITL: 7 tokens, 2 in the first chunk.
    assert len(itls) == 7 - 2


def test_tpot_needs_two_tokens() -> None:
    assert time_per_output_token_s(0.2, 0.6, 5) == pytest.approx(0.1)
    assert time_per_output_token_s(0.2, 0.2, 1) is None
    assert time_per_output_token_s(None, 0.5, 5) is None


def test_percentiles_interpolate_linearly() -> None:
    stats = summarize_ms([i / 1000.0 for i in range(1, 101)])  # 1..100 ms
    assert stats is not None
    assert stats.mean == pytest.approx(50.5)
    assert stats.median == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p95 == pytest.approx(95.05)
    assert stats.p99 == pytest.approx(99.01)
    assert stats.max == pytest.approx(100.0)
    assert stats.count == 100
    assert summarize_ms([]) is None


def test_failed_requests_are_counted_and_left_out_of_latencies() -> None:
    records = [
        _ok(0, 0.0, 0.1, 0.01, 11),
        _ok(1, 0.5, 0.3, 0.02, 6),
        _failed(2, 0.2, 5.0),  # a long failure must not touch any latency statistic
    ]
    m = compute_metrics(records, duration_s=2.0)
    assert (m.completed, m.failed) == (2, 1)
    assert m.ttft_ms.count == 2 and m.ttft_ms.max == pytest.approx(300.0)
    assert m.itl_ms.count == 10 + 5
    assert m.itl_ms.max == pytest.approx(20.0)
    assert m.e2e_ms.max == pytest.approx(400.0)
    assert m.tpot_ms.median == pytest.approx(15.0)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.total_input_tokens == 20 and m.total_output_tokens == 17
    assert m.output_throughput == pytest.approx(8.5)
    assert m.total_token_throughput == pytest.approx(18.5)
    assert m.goodput is None and m.slo_attainment is None


def test_goodput_and_slo_attainment() -> None:
    records = [
        _ok(0, 0.0, 0.1, 0.01, 5),  # meets ttft 200 and itl 20
        _ok(1, 0.0, 0.3, 0.01, 5),  # misses ttft
        _ok(2, 0.0, 0.1, 0.05, 5),  # misses itl (mean ITL 50 ms)
        _ok(3, 0.0, 0.15, 0.0, 1),  # one token: no ITL, so only TTFT is checked
        _failed(4, 0.0, 0.1),  # failed: a miss
    ]
    slo = parse_slo("ttft_ms=200,itl_ms=20")
    assert [meets_slo(r, slo) for r in records] == [True, False, False, True, False]
    m = compute_metrics(records, duration_s=4.0, slo=slo)
    assert m.goodput == pytest.approx(2 / 4.0)
    assert m.slo_attainment == pytest.approx(2 / 5)
    assert m.slo == "ttft_ms=200,itl_ms=20"
    # E2E: 140, 340, 300, 150 ms; the bound is inclusive.
    e2e_only = compute_metrics(records, duration_s=4.0, slo=Slo(e2e_ms=150.0))
    assert e2e_only.slo_attainment == pytest.approx(2 / 5)
    # TPOT: 10, 10, 50 ms and none for the one-token request.
    tpot_only = compute_metrics(records, duration_s=4.0, slo=Slo(tpot_ms=10.0 + 1e-9))
    assert tpot_only.goodput == pytest.approx(3 / 4.0)


def test_parse_slo_rejects_unknown_keys_and_bad_numbers() -> None:
    assert parse_slo("ttft_ms=1000, itl_ms=25") == Slo(ttft_ms=1000.0, itl_ms=25.0)
    assert parse_slo(None).empty
    for bad in ("ttft=100", "ttft_ms", "ttft_ms=abc", "itl_ms=-1"):
        with pytest.raises(ValueError, match="slo"):
            parse_slo(bad)


def test_peak_concurrency_counts_overlap_only() -> None:
    records = [
        _failed(0, 0.0, 1.0),  # [0, 1)
        _failed(1, 0.5, 1.0),  # [0.5, 1.5)
        _failed(2, 1.0, 0.2),  # starts as request 0 ends: 2 in flight, not 3
        _failed(3, 0.6, 0.1),  # [0.6, 0.7): 3 in flight with 0 and 1
    ]
    assert peak_concurrency(records) == 3
    assert peak_concurrency(records[:3]) == 2
    assert peak_concurrency([]) == 0
