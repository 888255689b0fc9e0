"""Prometheus metrics of the router, named ``pdserve:router_*`` like SGLang's.

Each router owns its own ``CollectorRegistry`` (no process-wide state), so
several routers can live in one test process. Per-worker gauges are filled
from the worker registry at scrape time, which keeps them exact and drops
workers that left.

Under ``--processes N`` (``multiprocess``) every process writes its values
to the files of prometheus_client's multiprocess mode (the parent sets
``PROMETHEUS_MULTIPROC_DIR`` before the children start) and a scrape,
whichever process answers, sums the counters and histograms of all. Each
process publishes its per-worker gauges every second and at a scrape: in
flight is the sum over processes, health the lowest, load the highest; a
worker that left reads 0 there instead of vanishing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pdserve.common.stats import DEFAULT_LATENCY_BUCKETS_S
from pdserve.router.workers import Worker
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


GAUGE_PUBLISH_S = 1.0  # how often a process of several publishes its per-worker gauges


class RouterMetrics:
    def __init__(self, latency_buckets_s: Sequence[float] = DEFAULT_LATENCY_BUCKETS_S,
                 multiprocess: bool = False) -> None:
        self.multiprocess = multiprocess
        self._published: set[tuple[str, str]] = set()
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
            ["role", "url"], registry=self.registry, multiprocess_mode="livesum")
        self.worker_healthy = Gauge(
            "pdserve:router_worker_healthy", "1 when the worker passed its last check.",
            ["role", "url"], registry=self.registry, multiprocess_mode="livemin")
        self.worker_load = Gauge(
            "pdserve:router_worker_load", "Running + queued + router in-flight requests.",
            ["role", "url"], registry=self.registry, multiprocess_mode="livemax")

    def render(self, workers: Iterable[Worker]) -> bytes:
        self.publish(workers)
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged)

    def publish(self, workers: Iterable[Worker]) -> None:
        """Set the per-worker gauges from the registry's workers."""
        gauges = (self.worker_in_flight, self.worker_healthy, self.worker_load)
        if not self.multiprocess:
            for gauge in gauges:
                gauge.clear()
        current = set()
        for w in workers:
            current.add((w.role, w.url))
            self.worker_in_flight.labels(w.role, w.url).set(w.in_flight)
            self.worker_healthy.labels(w.role, w.url).set(1 if w.healthy else 0)
            self.worker_load.labels(w.role, w.url).set(w.load)
        if self.multiprocess:  # shared files keep a departed worker's series: zero it
            for labels in self._published - current:
                for gauge in gauges:
                    gauge.labels(*labels).set(0)
            self._published = current
