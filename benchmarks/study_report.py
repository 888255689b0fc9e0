"""Tables, JSON and plot of the PD-versus-colocated study, from benchmark results.

Pure aggregation: ``study_rows`` flattens each mode's runs to one row per
(mode, scenario, request rate); the rest formats rows. The goodput ratio table
sets PD's goodput against colocated's for the same scenario and rate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from pdserve.benchmarks.plot import CurvePoint, inf_position
from pdserve.benchmarks.report import align, json_safe
from pdserve.benchmarks.runner import RunResult

MODES = ("colocated", "pd")


@dataclass(frozen=True)
class StudyRow:
    mode: str
    scenario: str
    request_rate: float
    completed: int
    failed: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    goodput: float | None
    slo_attainment: float | None
    output_throughput: float


def study_rows(mode: str, results: list[RunResult]) -> list[StudyRow]:
    rows = []
    for r in results:
        m = r.metrics
        rows.append(StudyRow(
            mode=mode, scenario=r.point.scenario, request_rate=r.point.request_rate,
            completed=m.completed, failed=m.failed,
            ttft_p50_ms=m.ttft_ms.median if m.ttft_ms else None,
            ttft_p99_ms=m.ttft_ms.p99 if m.ttft_ms else None,
            itl_p50_ms=m.itl_ms.median if m.itl_ms else None,
            itl_p99_ms=m.itl_ms.p99 if m.itl_ms else None,
            goodput=m.goodput, slo_attainment=m.slo_attainment,
            output_throughput=m.output_throughput,
        ))
    return rows


def _sort_key(row: StudyRow) -> tuple[str, float, int]:
    order = MODES.index(row.mode) if row.mode in MODES else len(MODES)
    return row.scenario, row.request_rate, order


def _cell(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]], num_left: int = 1) -> str:
    rule = ["---" if i < num_left else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def comparison_markdown(rows: list[StudyRow], slo_label: str) -> str:
    """The comparison table, then PD's goodput relative to colocated's."""
    header = ["scenario", "rate (req/s)", "mode", "ok/fail", "TTFT p50 (ms)", "TTFT p99 (ms)",
              "ITL p50 (ms)", "ITL p99 (ms)", "goodput (req/s)", "SLO attained", "out tok/s"]
    body = [[
        r.scenario, _cell(r.request_rate, 2), r.mode, f"{r.completed}/{r.failed}",
        _cell(r.ttft_p50_ms), _cell(r.ttft_p99_ms), _cell(r.itl_p50_ms, 2), _cell(r.itl_p99_ms, 2),
        _cell(r.goodput, 2), "-" if r.slo_attainment is None else f"{100 * r.slo_attainment:.0f}%",
        _cell(r.output_throughput),
    ] for r in sorted(rows, key=_sort_key)]
    parts = [f"SLO: {slo_label}", "", _markdown(header, body, num_left=3)]
    ratios = goodput_ratios(rows)
    if ratios:
        ratio_rows = [[s, _cell(rate, 2), "-" if v is None else f"{v:.2f}x"] for (s, rate), v in ratios.items()]
        parts += ["", _markdown(["scenario", "rate (req/s)", "PD / colocated goodput"], ratio_rows)]
    return "\n".join(parts) + "\n"


def goodput_ratios(rows: list[StudyRow]) -> dict[tuple[str, float], float | None]:
    """PD goodput / colocated goodput per (scenario, rate) that both modes ran.

    ``None`` where colocated's goodput is zero (the ratio is unbounded) or unknown.
    """
    by_key: dict[tuple[str, float], dict[str, StudyRow]] = defaultdict(dict)
    for r in rows:
        by_key[(r.scenario, r.request_rate)][r.mode] = r
    out: dict[tuple[str, float], float | None] = {}
    for key in sorted(by_key):
        modes = by_key[key]
        if "pd" not in modes or "colocated" not in modes:
            continue
        pd_good, colo_good = modes["pd"].goodput, modes["colocated"].goodput
        out[key] = pd_good / colo_good if pd_good is not None and colo_good else None
    return out


def comparison_json(rows: list[StudyRow], config: dict[str, Any]) -> dict[str, Any]:
    ratios = [
        {"scenario": s, "request_rate": rate, "pd_over_colocated_goodput": v}
        for (s, rate), v in goodput_ratios(rows).items()
    ]
    return json_safe({
        "config": config,
        "rows": [asdict(r) for r in sorted(rows, key=_sort_key)],
        "goodput_ratios": ratios,
    })


def comparison_text(rows: list[StudyRow]) -> str:
    """The same rows as an aligned plain-text table for the terminal."""
    header = ["scenario", "rate", "mode", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "goodput"]
    body = [[r.scenario, _cell(r.request_rate, 2), r.mode, _cell(r.ttft_p50_ms), _cell(r.ttft_p99_ms),
             _cell(r.itl_p50_ms, 2), _cell(r.itl_p99_ms, 2), _cell(r.goodput, 2)]
            for r in sorted(rows, key=_sort_key)]
    return align(body, header, num_left=3)


def study_curves(rows: list[StudyRow]) -> tuple[dict[str, dict[str, list[CurvePoint]]], float | None]:
    """Per scenario, per mode, the latency points against request rate."""
    inf_x = inf_position([r.request_rate for r in rows])
    grid: dict[str, dict[str, list[CurvePoint]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        x = inf_x if inf_x is not None and math.isinf(r.request_rate) else r.request_rate
        grid[r.scenario][r.mode].append(
            CurvePoint(x, r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms)
        )
    return {s: dict(m) for s, m in grid.items()}, inf_x
