"""``serving_cost router``: CPU per relayed token of ``pdserve router`` against ``sglang-router``.

Starts ``fake_upstream`` (a cheap OpenAI server streaming one token per SSE
chunk on a fixed schedule) and puts each router in front of it in turn:
``pdserve router`` (colocated, and PD with the fake playing both prefill and
decode), SGLang's Rust ``sglang-router``, and no router at all (the baseline).
For each it reports the router's CPU per relayed token (its whole process
tree), ITL and TPOT p50 through it, the delivery delay a probe stream sees,
and what each adds over the baseline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pdserve.benchmarks.fake_upstream import MODEL_NAME as FAKE_MODEL
from pdserve.benchmarks.serving.bench_runs import BenchRun, bench_argv, run_bench, send_requests
from pdserve.benchmarks.serving.config import RouterBenchConfig, Workload, prepare_dirs
from pdserve.benchmarks.serving.cpu import CpuSnapshot, idle_before_run, process_tree, system_busy_s
from pdserve.benchmarks.serving.probe import RelayProbe
from pdserve.benchmarks.serving.procs import (
    Child,
    CostError,
    free_port,
    log,
    python_module,
    running,
    wait_for,
    wait_healthy,
)
from pdserve.benchmarks.serving.profiles import Profiler
from pdserve.benchmarks.serving.report import environment, per_token_us, stat_ms

WARMUP_OUTPUT_LEN = 4
RELAY_CHECK = Workload(4, 2, 1, 1)
RELAY_CHECK_TIMEOUT_S = 10.0
TOKENIZER_LOOKUP_TIMEOUT_S = 120


@dataclass(frozen=True)
class Upstream:
    """The fake upstream: its decode (colocated) URL, its prefill URL, its process."""

    url: str
    prefill_url: str
    child: Child


@dataclass(frozen=True)
class RelayCpu:
    """CPU seconds spent during one router run, by whom."""

    router_cpu_s: float
    upstream_cpu_s: float
    self_cpu_s: float  # this process: the relay probe
    machine_busy_cpu_s: float
    window_s: float


def router_argv(target: str, port: int, up: Upstream, policy: str, max_tree_chars: int | None = None) -> list[str] | None:
    """The router's command line; None for the baseline without a router.
    ``max_tree_chars`` goes to pdserve's router only (sglang-router bounds its tree in nodes)."""
    host = ["--host", "127.0.0.1", "--port", str(port), "--policy", policy]
    if target == "direct":
        return None
    if target.startswith("pdserve"):
        pd = target.endswith("-pd")
        workers = ["--prefill", up.prefill_url, "--decode", up.url] if pd else ["--worker", up.url]
        bound = [] if max_tree_chars is None else ["--max-tree-chars", str(max_tree_chars)]
        return python_module("pdserve.cli", "router", *host, "--log-level", "warning", *bound, *workers)
    workers = (["--pd-disaggregation", "--prefill", up.prefill_url, "--decode", up.url]
               if target.endswith("-pd") else ["--worker-urls", up.url])
    return python_module("sglang_router.launch_router", *host, "--log-level", "warn",
                         "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), *workers)


def relays(base_url: str, model: str) -> bool:
    """Whether a short streamed completion goes through the router now."""
    with contextlib.suppress(CostError, OSError):
        return not send_requests(base_url, model, RELAY_CHECK, True, RELAY_CHECK_TIMEOUT_S, text=True).failed
    return False


def wait_relaying(child: Child, base_url: str, model: str, timeout_s: float) -> None:
    """Until the router is healthy and a short streamed completion goes through it."""
    wait_healthy(child, base_url + "/health", timeout_s)
    wait_for(child, lambda: relays(base_url, model), timeout_s, "no completion relayed")


def router_bench_argv(cfg: RouterBenchConfig, base_url: str, model: str, out_json: Path) -> list[str]:
    extra = ["--dataset", "random", "--model", model]
    if cfg.tokenizer:
        extra += ["--tokenizer", cfg.tokenizer]
    return bench_argv(base_url, out_json, cfg.workload, extra)


def _cpu_now(router_pids: list[int], up: Upstream) -> tuple[CpuSnapshot, CpuSnapshot, float, float]:
    return (CpuSnapshot.take(router_pids), CpuSnapshot.take([up.child.proc.pid]), system_busy_s(),
            time.process_time())


def measure_target(cfg: RouterBenchConfig, target: str, base_url: str, router_pid: int | None,
                   up: Upstream, log_dir: Path) -> dict[str, Any]:
    """One bench run through ``target`` with the relay probe beside it; its row of figures."""
    warm = Workload(cfg.workload.input_len, WARMUP_OUTPUT_LEN, cfg.workload.concurrency, cfg.workload.concurrency)
    if send_requests(base_url, FAKE_MODEL, warm, True, cfg.run_timeout_s, text=True).failed:
        raise CostError(f"{target}: warmup requests failed")
    router_pids = process_tree(router_pid) if router_pid else []
    profiler = (Profiler.start(router_pid, Path(cfg.profile_dir) / f"router-{target}.txt", log_dir,
                               cfg.profile_rate_hz, cfg.profile_native, subprocesses=True)
                if cfg.profile_dir and router_pid and target == "pdserve" else None)
    probe = RelayProbe(base_url, FAKE_MODEL, cfg.workload.output_len, up.url + "/get_server_info",
                       max(1, cfg.workload.concurrency // 2), cfg.probe_streams)
    idle_before = idle_before_run(cfg.wait_idle_s, cfg.idle_cores)
    before = _cpu_now(router_pids, up)
    probe.start()
    try:
        bench = run_bench(router_bench_argv(cfg, base_url, FAKE_MODEL, log_dir / f"bench_{target}.json"),
                          log_dir, f"bench-{target}", cfg.run_timeout_s)
    finally:
        probe.stop()
        after = _cpu_now(router_pids, up)
        profile = profiler.stop(cfg.profile_top_n) if profiler else None
    cpu = RelayCpu(after[0].since(before[0]), after[1].since(before[1]), after[3] - before[3],
                   after[2] - before[2], after[1].at_s - before[1].at_s)
    row = router_row(target, bench, probe, cpu)
    row["busy_cores_before"] = idle_before
    if profile is not None:
        row["profile"] = profile
    return row


def router_row(target: str, bench: BenchRun, probe: RelayProbe, cpu: RelayCpu) -> dict[str, Any]:
    """Per-token figures; the router relayed the bench's tokens and the probe's."""
    m = bench.metrics
    tokens = int(m["total_output_tokens"]) + probe.tokens
    return {
        "target": target, "output_tokens": tokens, "bench_output_tokens": m["total_output_tokens"],
        "failed": m["failed"], "wall_s": m["duration_s"], "tokens_per_s": m["output_throughput"],
        "router_cpu_us_per_token": per_token_us(cpu.router_cpu_s, tokens) if target != "direct" else None,
        "upstream_cpu_us_per_token": per_token_us(cpu.upstream_cpu_s, tokens),
        "router_cores": cpu.router_cpu_s / cpu.window_s, "upstream_cores": cpu.upstream_cpu_s / cpu.window_s,
        "client_cores": (bench.client_cpu_s + cpu.self_cpu_s) / cpu.window_s,
        "other_cores": (cpu.machine_busy_cpu_s - cpu.router_cpu_s - cpu.upstream_cpu_s - cpu.self_cpu_s
                        - bench.client_cpu_s) / cpu.window_s,
        "machine_busy_cores": cpu.machine_busy_cpu_s / cpu.window_s,
        "itl_p50_ms": stat_ms(m, "itl_ms"), "itl_p99_ms": stat_ms(m, "itl_ms", "p99"),
        "tpot_p50_ms": stat_ms(m, "tpot_ms"), "ttft_p50_ms": stat_ms(m, "ttft_ms"),
        **probe.summary(), **asdict(cpu), "client_cpu_s": bench.client_cpu_s,
    }


def run_one_target(cfg: RouterBenchConfig, target: str, up: Upstream, log_dir: Path) -> dict[str, Any]:
    """Starts the router of ``target`` (none for ``direct``) and measures through it."""
    port = free_port()
    argv = router_argv(target, port, up, cfg.policy, cfg.max_tree_chars)
    if argv is None:
        return measure_target(cfg, target, up.url, None, up, log_dir)
    with running(f"router-{target}", argv, log_dir) as router:
        base_url = f"http://127.0.0.1:{port}"
        wait_relaying(router, base_url, FAKE_MODEL, cfg.startup_timeout_s)
        return measure_target(cfg, target, base_url, router.proc.pid, up, log_dir)


def target_available(target: str) -> bool:
    """False for the sglang targets when ``sglang_router`` is not installed."""
    return not target.startswith("sglang") or importlib.util.find_spec("sglang_router") is not None


def add_comparisons(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What each target adds over ``direct`` (into its row), and pdserve/sglang CPU ratios."""
    by_target = {r["target"]: r for r in rows}
    direct = by_target.get("direct")
    for row in rows:
        if direct and row["itl_p50_ms"] is not None and direct["itl_p50_ms"] is not None:
            row["added_itl_p50_ms"] = row["itl_p50_ms"] - direct["itl_p50_ms"]
            row["added_tpot_p50_ms"] = row["tpot_p50_ms"] - direct["tpot_p50_ms"]
        if direct and row["relay_delay_p50_ms"] is not None and direct["relay_delay_p50_ms"] is not None:
            row["added_relay_delay_p50_ms"] = row["relay_delay_p50_ms"] - direct["relay_delay_p50_ms"]
    out: dict[str, Any] = {}
    for suffix in ("", "-pd"):
        ours, theirs = by_target.get("pdserve" + suffix), by_target.get("sglang" + suffix)
        if ours and theirs and ours["router_cpu_us_per_token"] and theirs["router_cpu_us_per_token"]:
            out[f"pdserve{suffix}_over_sglang{suffix}_cpu_per_token"] = (
                ours["router_cpu_us_per_token"] / theirs["router_cpu_us_per_token"])
    return out


def builtin_tokenizer() -> str | None:
    """The built-in tiny model's directory (it has a tokenizer), via the CLI."""
    try:
        out = subprocess.run(python_module("pdserve.cli", "model", "path", "tiny"), capture_output=True,
                             text=True, timeout=TOKENIZER_LOOKUP_TIMEOUT_S, check=True)
    except (subprocess.SubprocessError, OSError):
        log("warning: no built-in tokenizer; pdserve bench will approximate prompt lengths")
        return None
    return out.stdout.strip().splitlines()[-1]


def run_router(cfg: RouterBenchConfig) -> dict[str, Any]:
    """Every available target of ``cfg`` against one fake upstream; the JSON document of the figures."""
    log_dir = prepare_dirs(cfg, "router")
    if cfg.tokenizer is None:
        cfg = dataclasses.replace(cfg, tokenizer=builtin_tokenizer())
    port, prefill_port = free_port(), free_port()
    argv = python_module("pdserve.benchmarks.fake_upstream", "--port", str(port), "--prefill-port",
                         str(prefill_port), "--token-interval-ms", str(cfg.token_interval_ms))
    rows, skipped = [], []
    with running("fake-upstream", argv, log_dir) as fake:
        wait_healthy(fake, f"http://127.0.0.1:{port}/health", cfg.startup_timeout_s)
        up = Upstream(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prefill_port}", fake)
        for target in cfg.targets:
            if not target_available(target):
                log(f"skipping {target}: sglang_router is not installed (pip install sglang-router)")
                skipped.append(target)
                continue
            log(f"router: {target} run")
            rows.append(run_one_target(cfg, target, up, log_dir))
    return {"kind": "router", "config": asdict(cfg), "cpu_count": os.cpu_count(), "environment": environment(),
            "log_dir": str(log_dir), "runs": rows, "skipped": skipped, "comparison": add_comparisons(rows)}
