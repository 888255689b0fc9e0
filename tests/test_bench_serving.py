"""``pdserve bench`` against a fake server that streams at known times."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from pdserve.benchmarks.arrivals import arrival_offsets_s
from pdserve.benchmarks.bench_serving import BenchConfig, BenchOutcome, main, run_benchmark
from pdserve.benchmarks.report import JSON_SCHEMA_VERSION
from pdserve.tests.support.bench_fake_server import FakeBehavior, FakeServer
from pdserve.tests.support.ports import refusing_port
from pdserve.tests.support.waiting import wait_until

# The fake server sends chunk j at 200 ms + j * 50 ms after a request arrives, never
# earlier, so those are hard lower bounds on what the client measures. Upper
# bounds leave room for a loaded 2-core machine that runs other suites at once.
TTFT_S = 0.2
INTERVAL_S = 0.05
SLACK_S = 0.35


def _bench(server: FakeServer, **overrides: object) -> BenchOutcome:
    base = dict(base_url=server.base_url, num_prompts=4, random_input_len=16, random_output_len=8,
                warmup_requests=0, disable_tqdm=True)
    return asyncio.run(run_benchmark(BenchConfig(**{**base, **overrides})))  # type: ignore[arg-type]


def test_ttft_and_itl_match_the_server_schedule() -> None:
    with FakeServer(FakeBehavior(ttft_s=TTFT_S, chunk_interval_s=INTERVAL_S)) as server:
        outcome = _bench(server)
    (result,) = outcome.results
    assert outcome.model == "fake-model"  # discovered from /v1/models
    m = result.metrics
    assert (m.completed, m.failed) == (4, 0)
    for r in result.records:
        assert TTFT_S <= r.ttft_s < TTFT_S + SLACK_S
        assert all(t >= TTFT_S + j * INTERVAL_S for j, t in enumerate(r.chunk_times_s))
        assert r.chunk_tokens == (1,) * 8
        assert (r.prompt_tokens, r.output_tokens) == (16, 8)  # from the server's usage
        # One token per chunk: the ITLs are exactly the gaps between chunks.
        gaps = [b - a for a, b in zip(r.chunk_times_s, r.chunk_times_s[1:])]
        assert r.itls_s == pytest.approx(gaps)
        assert TTFT_S + 7 * INTERVAL_S <= r.e2e_s < TTFT_S + 7 * INTERVAL_S + SLACK_S
    assert m.itl_ms.count == 4 * 7
    assert m.itl_ms.median == pytest.approx(INTERVAL_S * 1000, abs=25)
    assert m.tpot_ms.median == pytest.approx(INTERVAL_S * 1000, abs=25)
    assert m.peak_concurrency == 4
    body = server.state.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 8 and body["model"] == "fake-model"
    assert "ignore_eos" not in body


@pytest.mark.parametrize("backend", ["openai", "pdserve"])
def test_multi_token_chunks_split_their_gap_evenly(backend: str) -> None:
    # 10 tokens, 4 per chunk: chunks of 4, 4, 2 tokens, 50 ms apart.
    behavior = FakeBehavior(ttft_s=TTFT_S, chunk_interval_s=INTERVAL_S, tokens_per_chunk=4)
    with FakeServer(behavior) as server:
        outcome = _bench(server, backend=backend, random_output_len=10, ignore_eos=True)
        body = server.state.bodies[0]
    assert body.get("ignore_eos") or body["sampling_params"]["ignore_eos"]
    records = outcome.results[0].records
    for r in records:
        assert r.success and r.chunk_tokens == (4, 4, 2) and r.output_tokens == 10
        t0, t1, t2 = r.chunk_times_s
        # Each chunk's gap is shared evenly by its tokens; the first chunk's tokens add none.
        assert r.itls_s == pytest.approx([(t1 - t0) / 4] * 4 + [(t2 - t1) / 2] * 2)
        assert t1 >= TTFT_S + INTERVAL_S and t2 >= TTFT_S + 2 * INTERVAL_S
    itls_ms = outcome.results[0].metrics.itl_ms
    assert itls_ms.median == pytest.approx(INTERVAL_S / 4 * 1000, abs=10)
    assert outcome.results[0].metrics.itl_ms.count == 4 * 6


def test_chunks_are_counted_only_after_every_stream_has_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting a stream's chunk tokens is CPU work on the client's one loop: done
    as each stream ends, it delayed the reading of the other streams' last chunks
    (and so inflated their TPOT) by milliseconds per finished request."""
    import time

    from pdserve.benchmarks import client

    send, count = client.Sender.send, client.Sender._chunk_tokens
    sends_done_s: list[float] = []
    counted_s: list[float] = []

    async def timed_send(self, *args):
        response = await send(self, *args)
        sends_done_s.append(time.perf_counter())
        return response

    def timed_count(self, stream):
        counted_s.append(time.perf_counter())
        return count(self, stream)

    monkeypatch.setattr(client.Sender, "send", timed_send)
    monkeypatch.setattr(client.Sender, "_chunk_tokens", timed_count)
    with FakeServer(FakeBehavior(ttft_s=0.05, chunk_interval_s=0.01, report_usage=False)) as server:
        outcome = _bench(server, num_prompts=6)
    assert outcome.results[0].metrics.completed == 6
    assert len(counted_s) == len(sends_done_s) == 6
    assert min(counted_s) >= max(sends_done_s)


def test_failed_requests_are_counted_and_left_out_of_latencies() -> None:
    behavior = FakeBehavior(ttft_s=TTFT_S, chunk_interval_s=0.01, fail_every=3)
    with FakeServer(behavior) as server:
        outcome = _bench(server, num_prompts=6, random_output_len=4, slo="ttft_ms=10000")
    result = outcome.results[0]
    m = result.metrics
    assert (m.completed, m.failed) == (4, 2)
    failed = [r for r in result.records if not r.success]
    assert all("HTTP 500" in r.error and "injected failure" in r.error for r in failed)
    assert m.ttft_ms.count == 4 and m.e2e_ms.count == 4
    assert m.total_output_tokens == 4 * 4
    assert m.slo_attainment == pytest.approx(4 / 6)


def test_timeouts_count_as_failed() -> None:
    behavior = FakeBehavior(ttft_s=0.05, chunk_interval_s=0.01, stall_every=2, stall_s=5.0)
    with FakeServer(behavior) as server:
        outcome = _bench(server, num_prompts=4, random_output_len=4, request_timeout_s=0.6)
    result = outcome.results[0]
    assert (result.metrics.completed, result.metrics.failed) == (2, 2)
    for r in result.records:
        if not r.success:
            assert r.error == "timeout after 0.6 s"
            assert 0.6 <= r.e2e_s < 0.6 + SLACK_S
            assert r.ttft_s is None and r.output_tokens == 0
    assert result.metrics.e2e_ms.max < 600


def test_chat_backend_streams_deltas() -> None:
    with FakeServer(FakeBehavior(ttft_s=0.05, chunk_interval_s=0.01)) as server:
        outcome = _bench(server, backend="openai-chat", random_output_len=5)
        body = server.state.bodies[0]
    assert body["messages"][0]["role"] == "user" and body["max_tokens"] == 5
    assert outcome.results[0].metrics.completed == 4
    assert all(r.output_tokens == 5 and len(r.itls_s) == 4 for r in outcome.results[0].records)


def test_server_tokenizer_gives_exact_prompt_lengths() -> None:
    from pdserve.model.builtin import ensure_builtin_model
    from transformers import AutoTokenizer

    tok_dir = ensure_builtin_model("tiny")
    behavior = FakeBehavior(ttft_s=0.02, chunk_interval_s=0.005, tokenizer_path=tok_dir)
    with FakeServer(behavior) as server:
        text_run = _bench(server, num_prompts=3, random_input_len=37, random_output_len=2)
        ids_run = _bench(server, backend="openai", dataset="random-ids", num_prompts=3,
                         random_input_len=37, random_output_len=2)
        bodies = server.state.bodies
    assert text_run.tokenizer == tok_dir and text_run.tokenizer_exact
    hf = AutoTokenizer.from_pretrained(tok_dir)
    for body in bodies[:3]:
        assert len(hf.encode(body["prompt"], add_special_tokens=False)) == 37
    for body in bodies[3:]:
        assert isinstance(body["prompt"], list) and len(body["prompt"]) == 37
        assert not set(body["prompt"]) & set(hf.all_special_ids)
    assert all(r.prompt_tokens == 37 for r in ids_run.results[0].records)


def test_cli_sweep_writes_json_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    with FakeServer(FakeBehavior(ttft_s=0.05, chunk_interval_s=0.01)) as server:
        rc = main([
            "--base-url", server.base_url, "--num-prompts", "4", "--traffic-scenario", "D(8,3)",
            "U(4,8)/(2,4)", "--max-concurrency", "1", "--max-concurrency", "4",
            "--request-rate", "inf", "--slo", "ttft_ms=5000,itl_ms=500", "--warmup-requests", "1",
            "--output-json", str(out_json), "--output-details", "--plot", str(out_png),
            "--disable-tqdm", "--api-key", "secret",
        ])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "Serving Benchmark Result" in stdout and "TTFT p99" in stdout
    doc = json.loads(out_json.read_text())
    assert doc["schema_version"] == JSON_SCHEMA_VERSION
    assert doc["config"]["model"] == "fake-model" and doc["config"]["api_key"] == "<redacted>"
    assert doc["config"]["request_rates"] == ["inf"]
    assert [(r["scenario"], r["max_concurrency"]) for r in doc["runs"]] == [
        ("D(8,3)", 1), ("D(8,3)", 4), ("U(4,8)/(2,4)", 1), ("U(4,8)/(2,4)", 4)]
    for run in doc["runs"]:
        metrics = run["metrics"]
        assert set(metrics["ttft_ms"]) == {"mean", "median", "p90", "p95", "p99", "max", "count"}
        assert metrics["completed"] == 4 and metrics["goodput"] > 0
        assert metrics["peak_concurrency"] == run["max_concurrency"]
        assert len(run["requests"]) == 4
        assert {"ttft_s", "e2e_s", "itls_s", "chunk_times_s", "output_tokens"} <= set(run["requests"][0])
    assert all(r["prompt_tokens"] == 8 for r in doc["runs"][0]["requests"])
    # The effective scenario lengths of each run: what its prompts really had.
    assert doc["runs"][0]["lengths"] == {"input_tokens": {"min": 8, "mean": 8.0, "max": 8},
                                         "output_tokens": {"min": 3, "mean": 3.0, "max": 3}}
    uniform = doc["runs"][2]["lengths"]
    assert 4 <= uniform["input_tokens"]["min"] <= uniform["input_tokens"]["mean"] <= uniform["input_tokens"]["max"] <= 8
    assert 2 <= uniform["output_tokens"]["min"] <= uniform["output_tokens"]["max"] <= 4
    sent = [r["prompt_tokens"] for r in doc["runs"][2]["requests"]]
    assert (min(sent), max(sent)) == (uniform["input_tokens"]["min"], uniform["input_tokens"]["max"])
    pytest.importorskip("matplotlib")
    assert out_png.stat().st_size > 10_000


def test_requests_leave_on_their_poisson_schedule() -> None:
    with FakeServer(FakeBehavior(ttft_s=0.02, chunk_interval_s=0.01)) as server:
        outcome = _bench(server, request_rates=(10.0, 1000.0), num_prompts=6, random_output_len=2, seed=3)
    assert [r.point.request_rate for r in outcome.results] == [10.0, 1000.0]
    for result in outcome.results:
        offsets = arrival_offsets_s(6, result.point.request_rate, 1.0, np.random.default_rng(3))
        starts = sorted(r.start_s for r in result.records)
        assert all(s >= off for s, off in zip(starts, offsets))  # never before its time
        assert result.metrics.duration_s >= offsets[-1] + 0.03
    slow, fast = outcome.results
    assert slow.metrics.duration_s > fast.metrics.duration_s


def test_bad_input_and_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--traffic-scenario", "D(1)"])
    assert exc.value.code == 2
    assert "expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--slo", "latency=5"])
    with refusing_port() as port:
        rc = main(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1", "--disable-tqdm"])
    assert rc == 1
    assert "pass --model" in capsys.readouterr().err


def test_help_works(capsys: pytest.CaptureFixture[str]) -> None:
    from pdserve.cli import main as cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--traffic-scenario" in capsys.readouterr().out


def test_config_defaults_match_parser() -> None:
    from pdserve.benchmarks.bench_serving import config_from_argv

    assert config_from_argv([]) == BenchConfig()


@pytest.mark.parametrize("client_keepalive_s, failures", [(0.3, 0), (30.0, 1)])
def test_a_connection_the_server_closed_while_the_loop_was_blocked_is_not_reused(
    monkeypatch: pytest.MonkeyPatch, client_keepalive_s: float, failures: int
) -> None:
    """Building a large dataset blocks the event loop for seconds; a keep-alive
    connection the server closed meanwhile must not carry the next request
    (with a client keep-alive longer than the server's, it does, and fails)."""
    from pdserve.benchmarks import bench_serving, client

    send = client.Sender.send
    server = FakeServer(FakeBehavior(ttft_s=0.01, chunk_interval_s=0.01), keep_alive_s=0.5)
    # Connections open as the loop blocks; then whether the server closed them meanwhile.
    # (Kept for the end: an assertion raised in here would count as a failed request.)
    blocked: list = []

    async def send_after_a_blocked_loop(self, *args):
        if not blocked:  # the loop does not run while the dataset is built
            blocked.append(server.num_connections())
            # Blocked until the server's keep-alive (0.5 s) has closed the idle connection.
            blocked.append(wait_until(lambda: server.num_connections() == 0, 10.0, message="connection kept"))
        return await send(self, *args)

    monkeypatch.setattr(client.Sender, "send", send_after_a_blocked_loop)
    monkeypatch.setattr(bench_serving, "KEEPALIVE_TIMEOUT_S", client_keepalive_s)
    with server:
        outcome = _bench(server, num_prompts=3, random_output_len=2)
    assert blocked == [1, True]  # one idle connection, closed by the server while the loop was blocked
    assert outcome.results[0].metrics.failed == failures
