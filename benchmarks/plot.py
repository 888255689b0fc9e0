"""Latency-percentile plots of a sweep: TTFT and ITL p50/p99 against load.

matplotlib is optional (the ``bench`` extra); it is imported only when a plot is
drawn, with the Agg backend so no display is needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from pdserve.benchmarks.runner import RunResult

MISSING_MATPLOTLIB = "matplotlib is not installed, so --plot is disabled (pip install 'pdserve[bench]')"


@dataclass(frozen=True)
class CurvePoint:
    x: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


PANELS = (("TTFT (ms)", "ttft_p50_ms", "ttft_p99_ms"), ("ITL (ms)", "itl_p50_ms", "itl_p99_ms"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_panel(ax, series: dict[str, list[CurvePoint]], p50: str, p99: str, inf_x: float | None) -> None:
    """Per series p50 solid and p99 dashed in one colour."""
    for i, (label, points) in enumerate(sorted(series.items())):
        points = sorted(points, key=lambda p: p.x)
        xs = [p.x for p in points]
        color = f"C{i % 10}"
        ax.plot(xs, [getattr(p, p50) for p in points], "o-", color=color, label=f"{label} p50")
        ax.plot(xs, [getattr(p, p99) for p in points], "s--", color=color, label=f"{label} p99")
    if inf_x is not None:
        # Points of an infinite request rate sit at inf_x; label that tick "inf".
        ticks = [t for t in ax.get_xticks() if 0 <= t < inf_x * 0.9]
        ax.set_xticks([*ticks, inf_x], [f"{t:g}" for t in ticks] + ["inf"])
    ax.grid(True, alpha=0.3)


def plot_curves(
    series: dict[str, list[CurvePoint]], x_label: str, path: str, title: str = "", inf_x: float | None = None
) -> None:
    """Two panels, TTFT and ITL, each with p50 and p99 of every series."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (ylabel, p50, p99) in zip(axes, PANELS, strict=True):
        _draw_panel(ax, series, p50, p99, inf_x)
        ax.set_xlabel(x_label)
        ax.set_ylabel(ylabel)
    axes[1].legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grid(
    grid: dict[str, dict[str, list[CurvePoint]]], x_label: str, path: str, title: str = "",
    inf_x: float | None = None,
) -> None:
    """One column per key of ``grid`` (e.g. scenario), rows TTFT and ITL, a line pair per series."""
    plt = _pyplot()
    columns = sorted(grid)
    fig, axes = plt.subplots(2, len(columns), figsize=(5 * len(columns), 8), squeeze=False)
    for col, key in enumerate(columns):
        for row, (ylabel, p50, p99) in enumerate(PANELS):
            ax = axes[row][col]
            _draw_panel(ax, grid[key], p50, p99, inf_x)
            ax.set_title(key if row == 0 else "")
            ax.set_xlabel(x_label)
            ax.set_ylabel(ylabel)
    axes[0][-1].legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curve_point(x: float, result: RunResult) -> CurvePoint:
    m = result.metrics
    return CurvePoint(
        x=x,
        ttft_p50_ms=m.ttft_ms.median if m.ttft_ms else None,
        ttft_p99_ms=m.ttft_ms.p99 if m.ttft_ms else None,
        itl_p50_ms=m.itl_ms.median if m.itl_ms else None,
        itl_p99_ms=m.itl_ms.p99 if m.itl_ms else None,
    )


def inf_position(xs: list[float]) -> float | None:
    """Where an infinite rate goes on a rate axis: right of the largest finite one."""
    if not any(math.isinf(x) for x in xs):
        return None
    finite = [x for x in xs if not math.isinf(x)]
    return 1.5 * max(finite) if finite else 1.0


@dataclass(frozen=True)
class Sweep:
    series: dict[str, list[CurvePoint]]
    x_label: str
    inf_x: float | None


def sweep_series(results: list[RunResult]) -> Sweep:
    """Curves of a sweep: against the request rate when several rates were run,
    else against the concurrency limit (runs without a limit are left out)."""
    by_rate = len({r.point.request_rate for r in results}) > 1
    many_conc = len({r.point.max_concurrency for r in results}) > 1
    inf_x = inf_position([r.point.request_rate for r in results]) if by_rate else None
    series: dict[str, list[CurvePoint]] = defaultdict(list)
    for r in results:
        x = r.point.request_rate if by_rate else r.point.max_concurrency
        if x is None:
            continue
        x = inf_x if inf_x is not None and math.isinf(x) else x
        label = r.point.scenario + (f" conc={r.point.max_concurrency}" if by_rate and many_conc else "")
        series[label].append(_curve_point(float(x), r))
    return Sweep(dict(series), "request rate (req/s)" if by_rate else "max concurrency", inf_x)


def plot_sweep(results: list[RunResult], path: str) -> bool:
    """Draw the sweep's plot; ``False`` when there is nothing to put on the x axis."""
    sweep = sweep_series(results)
    if not sweep.series:
        return False
    plot_curves(sweep.series, sweep.x_label, path, title="latency percentiles", inf_x=sweep.inf_x)
    return True
