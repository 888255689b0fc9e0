"""Where the requests of a run spent their time: ``pdserve bench --timing``.

With ``--timing`` every request asks the server for its journey
(``"return_timing": true``); the answer's ``timing.phases_s`` (router queue and
pick, front, D waiting for pages, P bootstrap, queue and prefill, KV transfer,
D queue, decode) is kept per request. Here each run becomes one stacked bar of
the mean seconds per phase: a PNG with matplotlib, otherwise a text table with
bars drawn in characters.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.benchmarks.report import align
from pdserve.benchmarks.runner import RunResult

# The journey's phases in the order a request passes them (pdserve's server).
PHASES = ("router_queue_and_pick", "front", "decode_wait_pages", "prefill_bootstrap", "prefill_queue",
          "prefill", "kv_transfer", "decode_queue", "decode")
BAR_WIDTH = 50


@dataclass(frozen=True)
class Breakdown:
    label: str  # the run: scenario, rate, concurrency
    num_requests: int  # requests whose answer carried a journey
    mean_phases_s: dict[str, float]  # phase -> mean seconds, in journey order
    mean_e2e_s: float  # what the client measured, for comparison

    def to_dict(self) -> dict:
        return {"label": self.label, "num_requests": self.num_requests,
                "mean_phases_ms": {k: v * 1e3 for k, v in self.mean_phases_s.items()},
                "mean_e2e_ms": self.mean_e2e_s * 1e3}


def _label(result: RunResult) -> str:
    p = result.point
    parts = [p.scenario, f"rate {p.request_rate:g}"]
    if p.max_concurrency is not None:
        parts.append(f"conc {p.max_concurrency}")
    return ", ".join(parts)


def breakdown(result: RunResult) -> Breakdown | None:
    """Mean seconds per phase over the run's requests that carried a journey."""
    records = [r for r in result.records if r.success and r.phases_s]
    if not records:
        return None
    names = [p for p in PHASES if any(p in r.phases_s for r in records)]
    names += sorted({k for r in records for k in r.phases_s} - set(names))
    means = {n: sum(r.phases_s.get(n, 0.0) for r in records) / len(records) for n in names}
    return Breakdown(_label(result), len(records), means, sum(r.e2e_s for r in records) / len(records))


def breakdowns(results: list[RunResult]) -> list[Breakdown]:
    return [b for b in map(breakdown, results) if b is not None]


def timing_table(items: list[Breakdown]) -> str:
    """Mean milliseconds per phase per run, then each run as a bar of phase letters."""
    if not items:
        return "no request carried a journey (is the server pdserve, and did it finish any?)"
    names = list(dict.fromkeys(n for b in items for n in b.mean_phases_s))
    rows = [[n, *(f"{b.mean_phases_s.get(n, 0.0) * 1e3:.2f}" for b in items)] for n in names]
    rows.append(["sum of phases", *(f"{sum(b.mean_phases_s.values()) * 1e3:.2f}" for b in items)])
    rows.append(["client e2e", *(f"{b.mean_e2e_s * 1e3:.2f}" for b in items)])
    header = ["mean ms per phase", *(b.label for b in items)]
    letters = {n: chr(ord("A") + i) for i, n in enumerate(names)}
    longest = max(sum(b.mean_phases_s.values()) for b in items) or 1.0
    bars = []
    for b in items:
        bar = "".join(letters[n] * round(BAR_WIDTH * s / longest) for n, s in b.mean_phases_s.items())
        bars.append(f"{b.label:<30} |{bar}")
    legend = "  ".join(f"{c}={n}" for n, c in letters.items())
    return "\n".join([align(rows, header), "", *bars, legend])


def plot_timing(items: list[Breakdown], path: str) -> None:
    """One stacked bar per run, a segment per phase (mean ms)."""
    from pdserve.benchmarks.plot import _pyplot

    plt = _pyplot()
    names = list(dict.fromkeys(n for b in items for n in b.mean_phases_s))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(items) + 4), 5))
    xs = range(len(items))
    bottoms = [0.0] * len(items)
    for i, name in enumerate(names):
        heights = [b.mean_phases_s.get(name, 0.0) * 1e3 for b in items]
        ax.bar(xs, heights, bottom=bottoms, label=name, color=f"C{i % 10}")
        bottoms = [a + h for a, h in zip(bottoms, heights, strict=True)]
    ax.scatter(xs, [b.mean_e2e_s * 1e3 for b in items], marker="_", s=400, color="black", label="client e2e", zorder=3)
    ax.set_xticks(list(xs), [b.label for b in items], rotation=15)
    ax.set_ylabel("mean ms per request")
    ax.set_title("Where a request's time goes")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
