"""Prometheus metrics of one instance, named ``pdserve:`` + SGLang's names.

Latency histograms are observed in the HTTP front, where a client sees the
tokens; engine gauges are refreshed from the engine's stats on each scrape.
Each server owns its registry: no process-wide global state.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160)


class ServerMetrics:
    def __init__(self, enabled: bool, model_name: str):
        self.enabled = enabled
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prefill tokens processed", labels, registry=r)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated", labels, registry=r)
        self.cached_tokens = Counter("pdserve:cached_tokens", "Prompt tokens served from the prefix cache", labels, registry=r)
        self.num_requests = Counter("pdserve:num_requests", "Requests finished", labels, registry=r)
        self.num_aborted = Counter("pdserve:num_aborted_requests", "Requests aborted or failed", labels, registry=r)
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token", labels, buckets=_LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Time between tokens", labels, buckets=_LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "End-to-end latency", labels, buckets=_LATENCY_BUCKETS_S, registry=r)
        self.running = Gauge("pdserve:num_running_reqs", "Requests decoding", labels, registry=r)
        self.queued = Gauge("pdserve:num_queue_reqs", "Requests waiting", labels, registry=r)
        self.token_usage = Gauge("pdserve:token_usage", "Fraction of KV pages in use", labels, registry=r)
        self.used_pages = Gauge("pdserve:kv_used_pages", "KV pages held by live requests", labels, registry=r)
        self.model_name = model_name

    def request_timer(self, prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, prompt_tokens)

    def update_engine(self, stats: dict) -> None:
        m = self.model_name
        self.running.labels(m).set(stats.get("num_running_reqs", 0))
        self.queued.labels(m).set(stats.get("num_queued_reqs", 0))
        self.token_usage.labels(m).set(stats.get("token_usage", 0.0))
        self.used_pages.labels(m).set(stats.get("kv_pool", {}).get("used_pages", 0))

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

    def finish(self, finish_reason: str | None) -> None:
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
