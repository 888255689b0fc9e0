"""Prometheus metrics of one instance, named ``pdserve:`` + SGLang's names.

Latency histograms are observed in the HTTP front, where a client sees the
tokens; engine gauges are refreshed from the engine's stats on each scrape.
What a PD engine counts itself (KV transfers, its queues: ``common/stats.py``)
comes with those stats and is exported as it is, by :class:`EngineStatsCollector`.
``per_stage_req_latency_seconds{stage=...}`` gets each finished request's
journey (``timing``): a decode instance leaves out the prefill phases its
prefill instance reported (that instance exports them), a prefill instance
leaves out its front, which is not on the client's path, and its view of the
transfer (``kv_transfer_latency_seconds`` has it; D's ``kv_transfer`` stage is
what the client waited for).
Each server owns its registry: no process-wide global state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from pdserve.common.config import MetricsConfig
from pdserve.common.messages import EngineStats
from pdserve.common.roles import Role
from pdserve.common.stats import StatsSnapshot
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

PREFIX = "pdserve:"
# Journey phases an instance of each role leaves out of its per-stage histogram.
# P's front is not on the client's path, and D measures the transfer as the client waits for it.
_NOT_OBSERVED = {Role.DECODE.value: {"prefill_queue", "prefill"}, Role.PREFILL.value: {"front", "kv_transfer"}}


class EngineStatsCollector:
    """The families of the engine's last ``metrics`` snapshot (``StatsBook``)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.snapshot = StatsSnapshot()

    def collect(self) -> Iterator[Metric]:
        snap, labels = self.snapshot, ["model_name"]
        helps = snap.help
        for name, value in snap.counters.items():
            family = CounterMetricFamily(PREFIX + name, helps.get(name, name), labels=labels)
            family.add_metric([self.model_name], value)
            yield family
        for name, value in snap.gauges.items():
            family = GaugeMetricFamily(PREFIX + name, helps.get(name, name), labels=labels)
            family.add_metric([self.model_name], value)
            yield family
        for name, hist in snap.histograms.items():
            family = HistogramMetricFamily(PREFIX + name, helps.get(name, name), labels=labels)
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, hist.buckets), "+Inf"], hist.counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([self.model_name], buckets, hist.sum)
            yield family


class ServerMetrics:
    def __init__(self, enabled: bool, model_name: str, buckets: MetricsConfig = MetricsConfig(),
                 role: str = Role.COLOCATED.value):
        self.enabled = enabled
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.not_observed = _NOT_OBSERVED.get(role, set())
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prefill tokens processed", labels, registry=r)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated", labels, registry=r)
        self.cached_tokens = Counter("pdserve:cached_tokens", "Prompt tokens served from the prefix cache", labels, registry=r)
        self.num_requests = Counter("pdserve:num_requests", "Requests finished", labels, registry=r)
        self.num_aborted = Counter("pdserve:num_aborted_requests", "Requests aborted or failed", labels, registry=r)
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token", labels, buckets=buckets.bucket_time_to_first_token, registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Time between tokens", labels, buckets=buckets.bucket_inter_token_latency, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "End-to-end latency", labels, buckets=buckets.bucket_e2e_request_latency, registry=r)
        self.stages = Histogram("pdserve:per_stage_req_latency_seconds", "Seconds a request spent in each phase of its journey",
                                [*labels, "stage"], buckets=buckets.bucket_per_stage_req_latency, registry=r)
        self.engine_stats = EngineStatsCollector(model_name)
        r.register(self.engine_stats)
        self.running = Gauge("pdserve:num_running_reqs", "Requests decoding", labels, registry=r)
        self.queued = Gauge("pdserve:num_queue_reqs", "Requests waiting", labels, registry=r)
        self.token_usage = Gauge("pdserve:token_usage", "Fraction of KV pages in use", labels, registry=r)
        self.used_pages = Gauge("pdserve:kv_used_pages", "KV pages held by live requests", labels, registry=r)
        self.model_name = model_name

    def request_timer(self, prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, prompt_tokens)

    def observe_journey(self, phases_s: dict[str, float]) -> None:
        if not self.enabled:
            return
        for stage, seconds in phases_s.items():
            if stage not in self.not_observed:
                self.stages.labels(self.model_name, stage).observe(seconds)

    def update_engine(self, stats: EngineStats | None) -> None:
        """Refresh the engine's gauges; None (an engine that keeps no stats) leaves them as they are."""
        if stats is None:
            return
        m = self.model_name
        self.running.labels(m).set(stats.num_running_reqs)
        self.queued.labels(m).set(stats.num_queued_reqs)
        self.token_usage.labels(m).set(stats.token_usage)
        self.used_pages.labels(m).set(stats.kv_pool.used_pages)
        self.engine_stats.snapshot = stats.role.metrics if stats.role is not None else StatsSnapshot()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one request's TTFT, per-token gaps and end-to-end latency."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int):
        self.m = metrics
        self.start_s = time.monotonic()
        self.last_s: float | None = None
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.aborted = False
        self.done = False

    def tokens(self, count: int, cached_tokens: int) -> None:
        if count <= 0 or not self.m.enabled:
            return
        now, name = time.monotonic(), self.m.model_name
        self.m.generation_tokens.labels(name).inc(count)
        if self.last_s is None:
            self.m.ttft.labels(name).observe(now - self.start_s)
        else:
            gap = (now - self.last_s) / count  # a chunk of k tokens: k equal gaps
            for _ in range(count):
                self.m.itl.labels(name).observe(gap)
        self.last_s = now
        self.cached_tokens = cached_tokens

    def abort(self) -> None:
        self.aborted = True

    def finish(self, finish_reason: str | None, phases_s: dict[str, float] | None = None) -> None:
        if self.done or not self.m.enabled:
            return
        self.done = True
        name = self.m.model_name
        self.m.prompt_tokens.labels(name).inc(self.prompt_tokens)
        self.m.cached_tokens.labels(name).inc(self.cached_tokens)
        if self.aborted or finish_reason in (None, "abort"):
            self.m.num_aborted.labels(name).inc()
            return
        self.m.num_requests.labels(name).inc()
        self.m.e2e.labels(name).observe(time.monotonic() - self.start_s)
        if phases_s:
            self.m.observe_journey(phases_s)
