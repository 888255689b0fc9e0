"""An engine's plain-data metrics, exported by its front as Prometheus families."""

from __future__ import annotations

import pytest
from pdserve.common.config import MetricsConfig
from pdserve.common.messages import EngineStats, KVPoolStats, RoleStats
from pdserve.common.stats import StatsBook
from pdserve.server.metrics import ServerMetrics
from prometheus_client.parser import text_string_to_metric_families


def _families(metrics: ServerMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def _engine_stats(book: StatsBook) -> EngineStats:
    """A decode engine's stats whose transfer metrics are ``book``'s."""
    pool = KVPoolStats(page_size=16, total_pages=8, free_pages=8, parked_pages=0, cached_pages=0, used_pages=0,
                       bytes_per_page=1024)
    role = RoleStats(metrics=book.snapshot(), instance_id="d", num_transferring_rooms=3, num_transfer_peers=1,
                     num_transfer_rooms=3)
    return EngineStats(pid=1, rank_pids=[1], num_running_reqs=0, num_queued_reqs=0, num_generated_tokens=0,
                       num_retracted_reqs=0, token_usage=0.0, kv_pool=pool, role=role)


def test_engine_snapshot_becomes_counter_gauge_and_cumulative_histogram() -> None:
    book = StatsBook()
    book.counter("kv_transfer_bytes", "bytes")
    book.gauge("num_decode_transfer_queue_reqs", "rooms")
    book.histogram("kv_transfer_latency_seconds", "latency", (0.01, 0.1, 1.0))
    book.inc("kv_transfer_bytes", 4096)
    book.set("num_decode_transfer_queue_reqs", 3)
    for value in (0.005, 0.01, 0.05, 0.5, 7.0):  # 0.01 falls in the 0.01 bucket (le is inclusive)
        book.observe("kv_transfer_latency_seconds", value)
    metrics = ServerMetrics(True, "m")
    metrics.update_engine(_engine_stats(book))
    found = _families(metrics)
    assert found["pdserve:kv_transfer_bytes"].type == "counter"
    assert found["pdserve:kv_transfer_bytes"].samples[0].value == 4096
    assert found["pdserve:num_decode_transfer_queue_reqs"].samples[0].value == 3
    hist = found["pdserve:kv_transfer_latency_seconds"]
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.01": 2, "0.1": 3, "1.0": 4, "+Inf": 5}
    by_name = {s.name: s.value for s in hist.samples}
    assert by_name["pdserve:kv_transfer_latency_seconds_count"] == 5
    assert by_name["pdserve:kv_transfer_latency_seconds_sum"] == pytest.approx(7.565)


def test_bucket_flags_reach_the_front_histograms_and_must_be_positive() -> None:
    metrics = ServerMetrics(True, "m", MetricsConfig(bucket_time_to_first_token=(0.5, 2.0)))
    metrics.request_timer(3).tokens(1, 0)
    bounds = {s.labels["le"] for s in _families(metrics)["pdserve:time_to_first_token_seconds"].samples
              if s.name.endswith("_bucket")}
    assert bounds == {"0.5", "2.0", "+Inf"}
    with pytest.raises(ValueError, match="bucket-e2e-request-latency"):
        MetricsConfig(bucket_e2e_request_latency=(0.0, 1.0))


def test_a_decode_instance_leaves_prefill_phases_to_the_prefill_instance() -> None:
    metrics = ServerMetrics(True, "m", role="decode")
    metrics.observe_journey({"decode": 0.2, "prefill": 0.1, "kv_transfer": 0.01})
    stages = {s.labels["stage"] for s in _families(metrics)["pdserve:per_stage_req_latency_seconds"].samples}
    assert stages == {"decode", "kv_transfer"}
