"""Plain-text tables and the JSON document of a benchmark."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from pdserve.benchmarks.metrics import RequestRecord, Stats
from pdserve.benchmarks.runner import RunResult

JSON_SCHEMA_VERSION = 1
LATENCY_ROWS = (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms"))
STAT_COLUMNS = ("mean", "median", "p90", "p95", "p99", "max")


def _num(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def align(rows: list[list[str]], header: list[str], num_left: int = 1) -> str:
    """Columns padded to their widest cell; the first ``num_left`` left, the rest right."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [c.ljust(w) if i < num_left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])


def run_table(result: RunResult) -> str:
    m, p = result.metrics, result.point
    facts = [
        ("Scenario", p.scenario),
        ("Request rate (req/s)", _num(p.request_rate)),
        ("Max concurrency", _num(p.max_concurrency)),
        ("Successful requests", _num(m.completed)),
        ("Failed requests", _num(m.failed)),
        ("Benchmark duration (s)", _num(m.duration_s)),
        ("Total input tokens", _num(m.total_input_tokens)),
        ("Total output tokens", _num(m.total_output_tokens)),
        ("Request throughput (req/s)", _num(m.request_throughput)),
        ("Input token throughput (tok/s)", _num(m.input_throughput)),
        ("Output token throughput (tok/s)", _num(m.output_throughput)),
        ("Total token throughput (tok/s)", _num(m.total_token_throughput)),
        ("Peak concurrency", _num(m.peak_concurrency)),
        ("Mean concurrency", _num(m.mean_concurrency)),
    ]
    if m.slo is not None:
        facts += [
            ("SLO", m.slo),
            ("Goodput (req/s)", _num(m.goodput)),
            ("SLO attainment (%)", _num(None if m.slo_attainment is None else 100 * m.slo_attainment)),
        ]
    width = max(len(k) for k, _ in facts) + 2
    value_width = max(16, *(len(v) for _, v in facts))
    lines = [" Serving Benchmark Result ".center(width + value_width, "=")]
    lines += [f"{k + ':':<{width}}{v:>{value_width}}" for k, v in facts]
    rows = [[label, *_stat_cells(getattr(m, attr))] for label, attr in LATENCY_ROWS]
    lines += ["", align(rows, ["latency (ms)", *STAT_COLUMNS])]
    return "\n".join(lines)


def _stat_cells(stats: Stats | None) -> list[str]:
    if stats is None:
        return ["-"] * len(STAT_COLUMNS)
    return [_num(getattr(stats, c)) for c in STAT_COLUMNS]


def _p(stats: Stats | None, key: str) -> float | None:
    return None if stats is None else getattr(stats, key)


def summary_table(results: list[RunResult]) -> str:
    """One row per run of a sweep."""
    header = ["scenario", "rate", "conc", "ok", "fail", "req/s", "out tok/s",
              "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "goodput"]
    rows = []
    for r in results:
        m = r.metrics
        rows.append([
            r.point.scenario, _num(r.point.request_rate), _num(r.point.max_concurrency),
            _num(m.completed), _num(m.failed), _num(m.request_throughput), _num(m.output_throughput),
            _num(_p(m.ttft_ms, "median")), _num(_p(m.ttft_ms, "p99")),
            _num(_p(m.itl_ms, "median")), _num(_p(m.itl_ms, "p99")), _num(m.goodput),
        ])
    return align(rows, header)


def json_safe(value: Any) -> Any:
    """Infinite floats become the string ``"inf"``: JSON has no infinity."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def request_dict(record: RequestRecord) -> dict[str, Any]:
    out = asdict(record)
    out["itls_s"] = record.itls_s
    out["tpot_s"] = record.tpot_s
    return out


def result_dict(result: RunResult, details: bool) -> dict[str, Any]:
    out: dict[str, Any] = {**asdict(result.point), "metrics": result.metrics.to_dict()}
    if result.lengths is not None:
        out["lengths"] = result.lengths
    if details:
        out["requests"] = [request_dict(r) for r in result.records]
    return out


def bench_json(config: dict[str, Any], results: list[RunResult], details: bool) -> dict[str, Any]:
    """``{"schema_version", "config", "runs": [{scenario, request_rate, max_concurrency,
    metrics, requests?}]}`` with latencies in ms and throughputs per second."""
    return json_safe({
        "schema_version": JSON_SCHEMA_VERSION,
        "config": config,
        "runs": [result_dict(r, details) for r in results],
    })
