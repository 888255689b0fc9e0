"""Serving metrics from per-request records: pure functions, no I/O.

Definitions (times from the moment the client sends the request):

- TTFT: arrival of the first streamed chunk that carries content.
- E2E latency: end of the response stream.
- ITL: every gap between consecutive content chunks; a chunk that carries k > 1
  tokens has its gap split evenly into k ITLs (SGLang's and vLLM's convention).
  Tokens that arrive in the first chunk add no ITL, so a request yields
  ``output_tokens - tokens_in_first_chunk`` ITLs. Percentiles pool the ITLs of
  all successful requests.
- TPOT: ``(e2e - ttft) / (output_tokens - 1)`` per request with > 1 output token.
- Goodput: successful requests meeting every SLO given, per second of run
  duration (DistServe's and vLLM's request goodput). SLO attainment: the same
  requests as a fraction of all requests sent, failed ones counting as misses.
- Peak concurrency: the most requests in flight at any instant.

Percentiles interpolate linearly between samples (numpy's default), as vLLM does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class RequestRecord:
    """What the client saw of one request; times in seconds."""

    index: int
    success: bool
    start_s: float  # send time, from the start of the run
    e2e_s: float  # from send to the end of the stream (or the failure)
    ttft_s: float | None = None
    chunk_times_s: tuple[float, ...] = ()  # arrival of each content chunk, from send
    chunk_tokens: tuple[int, ...] = ()  # tokens each content chunk carries
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    phases_s: dict[str, float] | None = None  # the server's journey of it (``--timing``)

    @property
    def end_s(self) -> float:
        return self.start_s + self.e2e_s

    @property
    def itls_s(self) -> list[float]:
        return inter_token_latencies_s(self.chunk_times_s, self.chunk_tokens)

    @property
    def tpot_s(self) -> float | None:
        return time_per_output_token_s(self.ttft_s, self.e2e_s, self.output_tokens)


def split_tokens(total_tokens: int, weights: list[float]) -> list[int]:
    """Spread ``total_tokens`` over chunks in proportion to ``weights``.

    Every chunk gets at least one token (a content chunk carries at least one);
    rounding goes by largest remainder so the counts sum to ``total_tokens``
    exactly. With no more tokens than chunks each chunk counts one.
    """
    num_chunks = len(weights)
    if num_chunks == 0:
        return []
    if total_tokens <= num_chunks:
        return [1] * num_chunks
    w = np.maximum(np.asarray(weights, dtype=float), 0.0)
    w = w / w.sum() if w.sum() > 0 else np.full(num_chunks, 1.0 / num_chunks)
    exact = w * total_tokens
    counts = np.maximum(1, np.floor(exact)).astype(int)
    for _ in range(total_tokens - int(counts.sum())):  # short: top up the largest remainders
        counts[int(np.argmax(exact - counts))] += 1
    for _ in range(int(counts.sum()) - total_tokens):  # over (the minimum of one): trim
        room = np.where(counts > 1, exact - counts, np.inf)
        counts[int(np.argmin(room))] -= 1
    return counts.tolist()


def inter_token_latencies_s(chunk_times_s: tuple[float, ...] | list[float], chunk_tokens: tuple[int, ...] | list[int]) -> list[float]:
    """ITLs of one request: each chunk's gap to its predecessor, split over its tokens."""
    itls: list[float] = []
    for i in range(1, len(chunk_times_s)):
        k = max(1, chunk_tokens[i]) if i < len(chunk_tokens) else 1
        gap_s = chunk_times_s[i] - chunk_times_s[i - 1]
        itls.extend([gap_s / k] * k)
    return itls


def time_per_output_token_s(ttft_s: float | None, e2e_s: float, output_tokens: int) -> float | None:
    if ttft_s is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


@dataclass(frozen=True)
class Stats:
    """Summary of a latency distribution, in milliseconds."""

    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    max: float
    count: int


def summarize_ms(values_s: list[float]) -> Stats | None:
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=float) * 1000.0
    p50, p90, p95, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
    return Stats(float(ms.mean()), p50, p90, p95, p99, float(ms.max()), len(ms))


@dataclass(frozen=True)
class Slo:
    """Per-request latency bounds in ms; ``None`` leaves a metric unconstrained.

    ``itl_ms`` bounds the request's mean ITL (DistServe's per-token SLO measured
    between streamed tokens), ``tpot_ms`` its TPOT, ``e2e_ms`` its E2E latency.
    """

    ttft_ms: float | None = None
    itl_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    @property
    def label(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name):g}" for f in fields(self) if getattr(self, f.name) is not None)


def parse_slo(text: str | None) -> Slo:
    """``"ttft_ms=1000,itl_ms=25"`` -> ``Slo``; unknown keys and bad numbers raise."""
    if not text:
        return Slo()
    known = {f.name for f in fields(Slo)}
    values: dict[str, float] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in known:
            raise ValueError(f"bad --slo item {item!r}; expected KEY=MS with KEY in {sorted(known)}")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"bad --slo value {value!r} for {key}") from None
        if values[key] <= 0:
            raise ValueError(f"--slo {key} must be positive")
    return Slo(**values)


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    if not record.success:
        return False
    itls = record.itls_s
    checks = (
        (slo.ttft_ms, record.ttft_s),
        (slo.itl_ms, sum(itls) / len(itls) if itls else None),
        (slo.tpot_ms, record.tpot_s),
        (slo.e2e_ms, record.e2e_s),
    )
    # A metric a request does not have (no ITL with one output token) cannot miss.
    return all(bound is None or value is None or value * 1000.0 <= bound for bound, value in checks)


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once; one ending as another starts do not overlap."""
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


@dataclass(frozen=True)
class RunMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    input_throughput: float  # tokens / s
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Stats | None
    itl_ms: Stats | None
    tpot_ms: Stats | None
    e2e_ms: Stats | None
    peak_concurrency: int
    mean_concurrency: float  # time-averaged requests in flight: sum(e2e) / duration
    slo: str | None = None
    goodput: float | None = None  # requests / s meeting every SLO
    slo_attainment: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def compute_metrics(records: list[RequestRecord], duration_s: float, slo: Slo | None = None) -> RunMetrics:
    ok = [r for r in records if r.success]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    goodput = attainment = None
    if slo is not None and not slo.empty:
        good = sum(1 for r in ok if meets_slo(r, slo))
        goodput = good * per_s
        attainment = good / len(records) if records else 0.0
    return RunMetrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) * per_s,
        input_throughput=total_in * per_s,
        output_throughput=total_out * per_s,
        total_token_throughput=(total_in + total_out) * per_s,
        ttft_ms=summarize_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_ms=summarize_ms([itl for r in ok for itl in r.itls_s]),
        tpot_ms=summarize_ms([t for r in ok if (t := r.tpot_s) is not None]),
        e2e_ms=summarize_ms([r.e2e_s for r in ok]),
        peak_concurrency=peak_concurrency(records),
        mean_concurrency=sum(r.e2e_s for r in records) * per_s,
        slo=slo.label if slo is not None and not slo.empty else None,
        goodput=goodput,
        slo_attainment=attainment,
    )
