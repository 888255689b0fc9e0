"""Prometheus metrics of the router, named ``pdserve:router_*`` like SGLang's.

Each router owns its own ``CollectorRegistry`` (no process-wide state), so
several routers can live in one test process. Per-worker gauges are filled
from the worker registry at scrape time, which keeps them exact and drops
workers that left.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pdserve.common.stats import DEFAULT_LATENCY_BUCKETS_S
from pdserve.router.workers import Worker
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RouterMetrics:
    def __init__(self, latency_buckets_s: Sequence[float] = DEFAULT_LATENCY_BUCKETS_S) -> None:
        self.registry = CollectorRegistry()
        buckets = tuple(latency_buckets_s)
        self.latency = Histogram(
            "pdserve:router_request_latency_seconds", "From receiving a request to its last byte relayed, by endpoint.",
            ["endpoint"], buckets=buckets, registry=self.registry)
        self.worker_requests = Counter(
            "pdserve:router_worker_requests", "Requests sent to each worker (every attempt).",
            ["role", "url"], registry=self.registry)
        self.worker_errors = Counter(
            "pdserve:router_worker_errors", "Attempts that failed on each worker (unreachable, 5xx, broken stream).",
            ["role", "url"], registry=self.registry)
        self.worker_latency = Histogram(
            "pdserve:router_worker_request_latency_seconds", "From sending a request to a worker to its answer's end.",
            ["role", "url"], buckets=buckets, registry=self.registry)
        self.stages = Histogram(
            "pdserve:per_stage_req_latency_seconds", "Seconds a request spent in each phase of its journey (router's phase).",
            ["stage"], buckets=buckets, registry=self.registry)
        self.requests = Counter(
            "pdserve:router_requests", "Requests received, by endpoint.",
            ["endpoint"], registry=self.registry)
        self.errors = Counter(
            "pdserve:router_request_errors", "Requests answered with an error, by status.",
            ["endpoint", "status"], registry=self.registry)
        self.retries = Counter(
            "pdserve:router_retries", "Attempts repeated on another worker or pair.",
            ["endpoint"], registry=self.registry)
        self.worker_in_flight = Gauge(
            "pdserve:router_worker_in_flight", "Requests the router has open on each worker.",
            ["role", "url"], registry=self.registry)
        self.worker_healthy = Gauge(
            "pdserve:router_worker_healthy", "1 when the worker passed its last check.",
            ["role", "url"], registry=self.registry)
        self.worker_load = Gauge(
            "pdserve:router_worker_load", "Running + queued + router in-flight requests.",
            ["role", "url"], registry=self.registry)

    def render(self, workers: Iterable[Worker]) -> bytes:
        for gauge in (self.worker_in_flight, self.worker_healthy, self.worker_load):
            gauge.clear()
        for w in workers:
            self.worker_in_flight.labels(w.role, w.url).set(w.in_flight)
            self.worker_healthy.labels(w.role, w.url).set(1 if w.healthy else 0)
            self.worker_load.labels(w.role, w.url).set(w.load)
        return generate_latest(self.registry)
