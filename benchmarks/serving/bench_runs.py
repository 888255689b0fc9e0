"""The load of a measured run: ``pdserve bench`` as a child, or an in-process client.

``pdserve bench`` streams and reports latencies; its CPU time is read from the
rusage of reaped children, so that the client's share of the machine can be
told apart from the server's. The in-process client sends the same random
prompts with ``"stream": false`` (which ``pdserve bench`` does not time), and
counts output tokens from the server's ``usage``.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.benchmarks.serving.config import Workload
from pdserve.benchmarks.serving.cpu import children_cpu_s
from pdserve.benchmarks.serving.procs import (
    CostError,
    http_get_json,
    log,
    python_module,
    start_child,
    stop_child,
)

PROMPT_ID_RANGE = (10, 500)
CLIENT_READ_BUFSIZE = 1 << 22


@dataclass(frozen=True)
class BenchRun:
    """One ``pdserve bench`` run: its metrics (first run of its JSON) and its own cost."""

    metrics: dict[str, Any]
    client_cpu_s: float
    client_wall_s: float
    requests: list[dict[str, Any]] = field(default_factory=list)  # with --output-details


def bench_argv(base_url: str, out_json: Path, workload: Workload, extra: list[str],
               warmup_requests: int = 0, details: bool = False) -> list[str]:
    """``pdserve bench`` on the OpenAI completions route, one run of ``workload``."""
    return python_module(
        "pdserve.cli", "bench", "--base-url", base_url, "--backend", "openai",
        "--random-input-len", str(workload.input_len), "--random-output-len", str(workload.output_len),
        "--num-prompts", str(workload.num_prompts), "--max-concurrency", str(workload.concurrency),
        "--ignore-eos", "--warmup-requests", str(warmup_requests), "--disable-tqdm",
        "--output-json", str(out_json), "--seed", str(workload.seed),
        *(["--output-details"] if details else []), *extra)


def run_bench(argv: list[str], log_dir: Path, name: str, timeout_s: float) -> BenchRun:
    """Runs the client to the end; its CPU time is the rusage of reaped children."""
    out_json = Path(argv[argv.index("--output-json") + 1])
    cpu_before, start = children_cpu_s(), time.perf_counter()
    child = start_child(name, argv, log_dir)
    try:
        returncode = child.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise CostError(f"{name} did not finish within {timeout_s:g} s:\n{child.log_tail()}") from None
    finally:
        if child.proc.returncode is None:
            stop_child(child)
    wall_s, cpu_s = time.perf_counter() - start, children_cpu_s() - cpu_before
    if returncode != 0 or not out_json.exists():
        raise CostError(f"{name} failed ({returncode}):\n{child.log_tail()}")
    run = json.loads(out_json.read_text())["runs"][0]
    if run["metrics"]["failed"]:
        log(f"warning: {name}: {run['metrics']['failed']} failed requests")
    return BenchRun(run["metrics"], cpu_s, wall_s, run.get("requests") or [])


def random_prompt(rng: random.Random, length: int, text: bool) -> list[int] | str:
    """``length`` random token ids, or as many random words (routers that take text only)."""
    ids = [rng.randrange(*PROMPT_ID_RANGE) for _ in range(length)]
    return " ".join(f"w{i}" for i in ids) if text else ids


def completion_body(model: str | None, prompt: list[int] | str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """A greedy ``/v1/completions`` body that runs to ``max_tokens`` and reports usage."""
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if model is not None:
        body["model"] = model
    return body


async def _post(session: Any, url: str, body: dict[str, Any]) -> int:
    """Output tokens of one completion (``usage.completion_tokens``); reads streams to the end."""
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise CostError(f"POST {url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        if not body["stream"]:
            return int((await resp.json(content_type=None))["usage"]["completion_tokens"])
        tokens = 0
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or {}
                tokens = int(usage.get("completion_tokens") or tokens)
        return tokens


@dataclass(frozen=True)
class ClientRun:
    """What the in-process client saw of one run."""

    output_tokens: int
    wall_s: float
    failed: int


async def _send_all(base_url: str, bodies: list[dict[str, Any]], concurrency: int, timeout_s: float) -> ClientRun:
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, read_bufsize=CLIENT_READ_BUFSIZE,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def one(body: dict[str, Any]) -> int | None:
            async with slots:
                try:
                    return await _post(session, url, body)
                except (aiohttp.ClientError, asyncio.TimeoutError, CostError, KeyError, ValueError) as exc:
                    log(f"request failed: {exc!r}")
                    return None

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(b) for b in bodies))
        wall_s = time.perf_counter() - start
    done = [c for c in counts if c is not None]
    return ClientRun(sum(done), wall_s, len(counts) - len(done))


def send_requests(base_url: str, model: str | None, workload: Workload, stream: bool,
                  timeout_s: float, text: bool = False) -> ClientRun:
    """``num_prompts`` completions of random prompts at ``concurrency``."""
    rng = random.Random(workload.seed)
    bodies = [completion_body(model, random_prompt(rng, workload.input_len, text), workload.output_len, stream)
              for _ in range(workload.num_prompts)]
    return asyncio.run(_send_all(base_url, bodies, workload.concurrency, timeout_s))


def first_model(base_url: str) -> str | None:
    """The first model ``GET /v1/models`` names, or None."""
    try:
        data = http_get_json(base_url.rstrip("/") + "/v1/models").get("data") or []
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        return None
    return str(data[0]["id"]) if data else None
