"""Prometheus metrics of the router, named ``pdserve:router_*`` like SGLang's.

Each router owns its own ``CollectorRegistry`` (no process-wide state), so
several routers can live in one test process. Per-worker gauges are filled
from the worker registry at scrape time, which keeps them exact and drops
workers that left.
"""

from __future__ import annotations

from collections.abc import Iterable

from pdserve.router.workers import Worker
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
