"""The pure parts of ``benchmarks/served_vs_engine.py``: the decode-window rate and
the grouping of a server's processes by command line (no GPU, no server)."""

from __future__ import annotations

import pytest
from pdserve.benchmarks.served_vs_engine import (
    comparison_row,
    decode_window_rate,
    group_processes,
    median_wave,
    wave_seed,
)


def _request(start_s: float, chunk_times_s: list[float], chunk_tokens: list[int], success: bool = True) -> dict:
    return {"success": success, "start_s": start_s, "chunk_times_s": chunk_times_s, "chunk_tokens": chunk_tokens,
            "e2e_s": chunk_times_s[-1] if chunk_times_s else 0.5}


# A decodes over (1, 4], B over (1.5, 3.5]: both at once over (1.5, 3.5]. A failed
# request and one that streamed nothing count neither in the wave nor in the tokens.
WAVE = [
    _request(0.0, [1.0, 2.0, 3.0, 4.0], [1, 2, 2, 1]),
    _request(0.5, [1.0, 2.0, 3.0], [1, 1, 1]),
    _request(0.0, [1.0, 2.0], [5, 5], success=False),
    _request(0.0, [], []),
]


def test_decode_window_counts_tokens_while_the_whole_wave_decodes() -> None:
    rate = decode_window_rate(WAVE)
    # (1.5, 3.5]: A's chunks at 2 and 3 (2 + 2 tokens), B's at 2.5 and 3.5 (1 + 1).
    assert rate == {"window_s": pytest.approx(2.0), "tokens": 6, "tokens_per_s": pytest.approx(3.0), "share": 0.9}


def test_decode_window_at_half_the_wave_spans_any_decoding_request() -> None:
    rate = decode_window_rate(WAVE, share=0.5)
    # (1, 4]: A's chunks after its first, which opens the window (2 + 2 + 1), and all of B's (3 x 1).
    assert rate["window_s"] == pytest.approx(3.0)
    assert rate["tokens"] == 8
    assert rate["tokens_per_s"] == pytest.approx(8 / 3)


def test_decode_window_of_no_successful_request_is_empty() -> None:
    assert decode_window_rate(WAVE[2:]) == {"window_s": 0, "tokens": 0, "tokens_per_s": 0.0, "share": 0.9}


def test_group_processes_tells_front_engine_and_router_apart() -> None:
    cmdlines = {
        10: "python -m pdserve.cli up --num-colocated 1 --port 30010",
        11: "python -m pdserve.cli router --host 127.0.0.1 --worker http://127.0.0.1:30012",
        12: "python -m pdserve.cli serve --port 30012 --model-path llama-3.2-1b",
        13: "python -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5) --multiprocessing-fork",
        14: "python -m pdserve.cli serve --port 30013",
    }
    assert group_processes(cmdlines) == {"front": [12, 14], "engine": [13], "router": [11]}


def test_group_processes_counts_a_routers_spawned_processes_as_router() -> None:
    spawn = "python -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5) --multiprocessing-fork"
    cmdlines = {11: "python -m pdserve.cli router --processes 2 --worker http://127.0.0.1:30012",
                12: "python -m pdserve.cli serve --port 30012", 21: spawn, 22: spawn, 31: spawn}
    parents = {21: 11, 22: 11, 31: 12}
    assert group_processes(cmdlines, parents) == {"front": [12], "engine": [31], "router": [11, 21, 22]}


def test_group_processes_leaves_out_empty_groups() -> None:
    assert group_processes({1: "python -m pdserve.cli serve --port 1", 2: "sleep 5"}) == {"front": [1]}


def _wave(rate: float, tpot_ms: float) -> dict:
    return {"decode_window": {"tokens_per_s": rate}, "tpot_p50_ms": tpot_ms, "failed": 0}


def test_the_median_wave_is_reported_with_every_wave_beside_it() -> None:
    waves = [_wave(900.0, 3.0), _wave(1000.0, 2.5), _wave(700.0, 4.0)]
    row = median_wave(waves)
    assert row["decode_window"]["tokens_per_s"] == 900.0 and row["tpot_p50_ms"] == 3.0  # one wave's own figures
    assert [w["decode_tokens_per_s"] for w in row["waves"]] == [900.0, 1000.0, 700.0]
    assert median_wave(waves[:2])["decode_window"]["tokens_per_s"] == 900.0  # the lower of two
    assert median_wave(waves[:1])["waves"] == [{"decode_tokens_per_s": 900.0, "tpot_p50_ms": 3.0}]


def test_no_two_waves_share_prompts() -> None:
    seeds = {wave_seed(c, w) for c in (1, 64, 128, 256, 512) for w in range(5)}
    assert len(seeds) == 25


def test_each_router_process_count_is_compared_with_direct_and_the_last_is_up() -> None:
    def run(rate: float) -> dict:
        return {**_wave(rate, 3.0), "output_tokens_per_s": rate / 2}

    engine = {"tokens_per_s": 1000.0, "step_s": 0.002}
    row = comparison_row(engine, run(900.0), {1: run(855.0), 2: run(900.0)})
    assert row["direct_vs_engine"] == pytest.approx(0.9)
    assert row["up_vs_direct_by_router_processes"] == {1: pytest.approx(0.95), 2: pytest.approx(1.0)}
    assert row["up_router_processes"] == 2 and row["up_vs_direct"] == pytest.approx(1.0)
    assert set(row["up_runs"]) == {1, 2}
    single = comparison_row(engine, run(900.0), {1: run(855.0)})
    assert single["up_vs_direct"] == pytest.approx(0.95) and "up_runs" not in single
    assert comparison_row(engine, run(900.0), {})["up"] is None
