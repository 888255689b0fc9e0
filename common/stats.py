"""Numbers an engine process keeps for Prometheus, in plain data.

The engine has no HTTP server; its front scrapes it with a ``stats`` control
request. What it counts (KV transfers, bootstrap failures, queue lengths) is
kept here as plain counters, gauges and histograms whose ``snapshot()`` is a
:class:`StatsSnapshot` message that crosses the pipe, and the front turns each
snapshot into metric families named ``pdserve:<name>`` (``server/metrics.py``).

Histograms follow Prometheus' meaning: ``counts[i]`` observations fell at or
below ``buckets[i]`` and above the bucket before it; the last slot is ``+Inf``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.common.codec import message

# The latency buckets every pdserve histogram starts from (SGLang's, seconds).
DEFAULT_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1,
                             2.5, 5, 7.5, 10, 20, 40, 80, 160)
# Descriptors one KV transfer posts: a run of pages per (layer, K/V) region.
DESCRIPTOR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@message
@dataclass(frozen=True, kw_only=True)
class HistogramSnapshot:
    buckets: list[float]  # upper bounds, ascending
    counts: list[int]  # per bucket, then ``+Inf``: not cumulative
    sum: float


@message
@dataclass(frozen=True, kw_only=True)
class StatsSnapshot:
    """A :class:`StatsBook`'s values at one time, by metric name."""

    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, HistogramSnapshot] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)


@dataclass
class HistogramData:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.buckets = tuple(sorted(float(b) for b in self.buckets))
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(buckets=list(self.buckets), counts=list(self.counts), sum=self.total)


@dataclass
class StatsBook:
    """One process's counters, gauges and histograms, each with a help text."""

    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, HistogramData] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)

    def counter(self, name: str, help_text: str) -> None:
        self.counters[name] = 0.0
        self.help[name] = help_text

    def gauge(self, name: str, help_text: str) -> None:
        self.gauges[name] = 0.0
        self.help[name] = help_text

    def histogram(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.histograms[name] = HistogramData(tuple(buckets))
        self.help[name] = help_text

    def inc(self, name: str, amount: float = 1.0) -> None:
        self.counters[name] += amount

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(counters=dict(self.counters), gauges=dict(self.gauges),
                             histograms={n: h.snapshot() for n, h in self.histograms.items()}, help=dict(self.help))
