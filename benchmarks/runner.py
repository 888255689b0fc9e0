"""One benchmark run: warm up, send every request on its arrival schedule, measure.

Requests leave at their scheduled offsets; with a concurrency limit a request that
is due waits for a free slot (its latencies count from when it is actually sent,
as in vLLM and SGLang). The run's duration is from the first scheduled send to the
last response's end.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.benchmarks.datasets import BenchRequest
from pdserve.benchmarks.metrics import RequestRecord, RunMetrics, Slo, compute_metrics

if TYPE_CHECKING:
    from pdserve.benchmarks.client import Response, Sender


class BenchError(RuntimeError):
    """The benchmark cannot go on (server unreachable, warmup failed, bad setup)."""


@dataclass(frozen=True)
class RunPoint:
    """Where a run sits in a sweep."""

    scenario: str  # traffic scenario label, or the dataset's name
    request_rate: float
    max_concurrency: int | None


@dataclass(frozen=True)
class RunResult:
    point: RunPoint
    metrics: RunMetrics
    records: tuple[RequestRecord, ...]
    # The prompts' effective token lengths and the output lengths asked (datasets.length_summary).
    lengths: dict[str, dict[str, float]] | None = None


def make_progress(total: int, disable: bool, desc: str) -> Any:
    """A tqdm bar, or ``None`` when disabled or tqdm is not installed."""
    if disable:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


async def warm_up(sender: Sender, requests: list[BenchRequest], num_requests: int) -> None:
    """Send ``num_requests`` prompts at once; any failure stops the benchmark."""
    if num_requests <= 0:
        return
    chosen = [requests[i % len(requests)] for i in range(num_requests)]
    responses = await asyncio.gather(*(sender.send(i, r, time.perf_counter()) for i, r in enumerate(chosen)))
    failed = [r for r in responses if r.error is not None]
    if failed:
        raise BenchError(f"warmup request failed: {failed[0].error}")


async def send_on_schedule(
    sender: Sender,
    requests: list[BenchRequest],
    offsets_s: list[float],
    max_concurrency: int | None,
    progress: Any = None,
) -> tuple[list[RequestRecord], float]:
    """Send request i at ``offsets_s[i]``; returns the records and the run duration."""
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    run_start = time.perf_counter()

    async def one(index: int, req: BenchRequest, offset_s: float) -> Response:
        delay_s = run_start + offset_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if slots is None:
            response = await sender.send(index, req, run_start)
        else:
            async with slots:
                response = await sender.send(index, req, run_start)
        if progress is not None:
            progress.update(1)
        return response

    tasks = [one(i, req, off) for i, (req, off) in enumerate(zip(requests, offsets_s, strict=True))]
    responses = await asyncio.gather(*tasks)
    duration_s = time.perf_counter() - run_start
    return [sender.record(r) for r in responses], duration_s


async def run_point(
    sender: Sender,
    requests: list[BenchRequest],
    offsets_s: list[float],
    point: RunPoint,
    slo: Slo,
    disable_progress: bool = False,
) -> RunResult:
    desc = f"{point.scenario} rate={point.request_rate:g} conc={point.max_concurrency or '-'}"
    progress = make_progress(len(requests), disable_progress, desc)
    try:
        records, duration_s = await send_on_schedule(
            sender, requests, offsets_s, point.max_concurrency, progress
        )
    finally:
        if progress is not None:
            progress.close()
    return RunResult(point, compute_metrics(records, duration_s, slo), tuple(records))
