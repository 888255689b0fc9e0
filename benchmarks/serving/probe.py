"""The delivery delay of relayed tokens: upstream write to client read.

A constant relay time cancels out of inter-token latency, so ITL differences
hide what a router adds to every token. The fake upstream stamps each token's
SSE event with the CLOCK_MONOTONIC time it was written; a probe stream on the
same host subtracts that from its own read time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.benchmarks.fake_upstream import SENT_AT_KEY
from pdserve.benchmarks.serving.bench_runs import completion_body, random_prompt
from pdserve.benchmarks.serving.procs import log

SENT_AT_RE = re.compile(rb'"' + SENT_AT_KEY.encode() + rb'":\s*([0-9.]+)')
PROBE_PROMPT_LEN = 16
LOAD_POLL_S = 0.05
RETRY_PAUSE_S = 0.1
THREAD_WAIT_S = 10.0


@dataclass
class RelayProbe:
    """Streams sent next to a run that time each token from the upstream's write
    (``fake_sent_at_s``, CLOCK_MONOTONIC) to this process's read: the delivery
    delay, which a router lengthens by its relay time (ITL differences hide a
    constant relay time)."""

    base_url: str
    model: str
    output_len: int
    load_url: str  # the upstream's /get_server_info: probing starts once the run's load is on
    min_running: int
    num_streams: int = 1
    delays_s: list[float] = field(default_factory=list)
    tokens: int = 0
    thread: threading.Thread | None = None
    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Task | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="relay-probe", daemon=True)
        self.thread.start()
        self.ready.wait(timeout=THREAD_WAIT_S)

    def stop(self) -> None:
        if self.loop is not None and self.task is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.task.cancel)
        if self.thread is not None:
            self.thread.join(timeout=THREAD_WAIT_S)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(self._main())
        self.ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.task)
        self.loop.close()

    async def _main(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await self._wait_for_load(session)
            await asyncio.gather(*(self._loop_streams(session, i) for i in range(self.num_streams)))

    async def _wait_for_load(self, session: Any) -> None:
        while True:
            with contextlib.suppress(OSError, ValueError, asyncio.TimeoutError):
                async with session.get(self.load_url) as resp:
                    if int((await resp.json(content_type=None)).get("num_running_reqs", 0)) >= self.min_running:
                        return
            await asyncio.sleep(LOAD_POLL_S)

    async def _loop_streams(self, session: Any, index: int) -> None:
        import aiohttp

        rng = random.Random(index)
        url = self.base_url.rstrip("/") + "/v1/completions"
        while True:
            body = completion_body(self.model, random_prompt(rng, PROBE_PROMPT_LEN, True), self.output_len, True)
            try:
                async with session.post(url, json=body) as resp:
                    async for line in resp.content:
                        self._on_line(line)
            except (OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log(f"relay probe: {exc!r}")
                await asyncio.sleep(RETRY_PAUSE_S)

    def _on_line(self, line: bytes) -> None:
        match = SENT_AT_RE.search(line)
        if match is not None:
            self.delays_s.append(time.monotonic() - float(match.group(1)))
            self.tokens += 1

    def summary(self) -> dict[str, Any]:
        delays_ms = sorted(1e3 * d for d in self.delays_s)
        return {"probe_tokens": self.tokens, "relay_delay_p50_ms": percentile(delays_ms, 50),
                "relay_delay_p90_ms": percentile(delays_ms, 90), "relay_delay_p99_ms": percentile(delays_ms, 99)}


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """The nearest-rank ``pct`` percentile of already sorted values; None when empty."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]
