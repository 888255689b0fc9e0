"""``serving_cost front``: CPU per output token of one instance's front and engine.

Starts ``pdserve serve`` (the built-in ``tiny`` model on CPU unless extra server
flags say otherwise), drives it with ``pdserve bench`` (streamed), then with an
in-process client at the same concurrency (``"stream": false``). Around each
run it reads the CPU time of the front (the ``serve`` process and its helpers)
and of the engine (the multiprocessing spawn child) apart, and divides by the
output tokens the server reported.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.benchmarks.serving.bench_runs import bench_argv, first_model, run_bench, send_requests
from pdserve.benchmarks.serving.config import FrontConfig, Workload, prepare_dirs
from pdserve.benchmarks.serving.cpu import (
    CpuSnapshot,
    idle_before_run,
    proc_cmdline,
    split_front_engine,
    system_busy_s,
)
from pdserve.benchmarks.serving.procs import (
    CostError,
    free_port,
    log,
    python_module,
    running,
    wait_healthy,
)
from pdserve.benchmarks.serving.profiles import Profiler
from pdserve.benchmarks.serving.report import environment, per_token_us, stat_ms

WARMUP_OUTPUT_LEN = 8


@dataclass
class Meter:
    """CPU of the front, the engine and the whole machine over one run."""

    serve_pid: int
    engine_mark: str
    front: list[int] = field(default_factory=list)
    engine: list[int] = field(default_factory=list)
    before: tuple[CpuSnapshot, CpuSnapshot, float, float] | None = None

    def start(self) -> None:
        self.front, self.engine = split_front_engine(self.serve_pid, self.engine_mark)
        if not self.engine:
            raise CostError(f"no engine process under pid {self.serve_pid} (cmdline mark {self.engine_mark!r})")
        self.before = (CpuSnapshot.take(self.front), CpuSnapshot.take(self.engine), system_busy_s(),
                       time.process_time())

    def stop(self) -> dict[str, float]:
        """CPU seconds of each part; ``self_cpu_s`` is this process (an in-process client)."""
        assert self.before is not None
        front0, engine0, busy0, self0 = self.before
        front1, engine1 = CpuSnapshot.take(self.front), CpuSnapshot.take(self.engine)
        return {"front_cpu_s": front1.since(front0), "engine_cpu_s": engine1.since(engine0),
                "self_cpu_s": time.process_time() - self0, "machine_busy_cpu_s": system_busy_s() - busy0,
                "window_s": front1.at_s - front0.at_s}


def front_row(mode: str, cpu: dict[str, float], tokens: int, wall_s: float, bench_cpu_s: float,
              metrics: dict[str, Any] | None) -> dict[str, Any]:
    """``bench_cpu_s``: a ``pdserve bench`` child's CPU; the client is that plus this process."""
    client_cpu_s = bench_cpu_s + cpu["self_cpu_s"]
    other_cpu_s = cpu["machine_busy_cpu_s"] - cpu["front_cpu_s"] - cpu["engine_cpu_s"] - client_cpu_s
    row: dict[str, Any] = {
        "mode": mode, "output_tokens": tokens, "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s else None,
        "front_cpu_us_per_token": per_token_us(cpu["front_cpu_s"], tokens),
        "engine_cpu_us_per_token": per_token_us(cpu["engine_cpu_s"], tokens),
        "client_cpu_us_per_token": per_token_us(client_cpu_s, tokens),
        "front_cores": cpu["front_cpu_s"] / cpu["window_s"],
        "engine_cores": cpu["engine_cpu_s"] / cpu["window_s"],
        "client_cores": client_cpu_s / cpu["window_s"],
        "other_cores": other_cpu_s / cpu["window_s"],
        "machine_busy_cores": cpu["machine_busy_cpu_s"] / cpu["window_s"],
        "client_cpu_s": client_cpu_s, **cpu,
    }
    if metrics is not None:
        row.update({"failed": metrics["failed"], "itl_p50_ms": stat_ms(metrics, "itl_ms"),
                    "tpot_p50_ms": stat_ms(metrics, "tpot_ms"), "ttft_p50_ms": stat_ms(metrics, "ttft_ms")})
    return row


def warm_up(base_url: str, model: str | None, workload: Workload, timeout_s: float) -> None:
    """Both paths once at full concurrency, with short outputs."""
    short = Workload(workload.input_len, WARMUP_OUTPUT_LEN, workload.concurrency, workload.concurrency,
                     workload.seed + 1)
    for stream in (True, False):
        run = send_requests(base_url, model, short, stream, timeout_s)
        if run.failed:
            raise CostError(f"{run.failed} warmup requests failed")


def front_stream_run(cfg: FrontConfig, base_url: str, meter: Meter, log_dir: Path) -> dict[str, Any]:
    """The streamed run: ``pdserve bench``, optionally under py-spy."""
    out_json = log_dir / "bench_stream.json"
    argv = bench_argv(base_url, out_json, cfg.workload, ["--dataset", "random-ids"])
    idle_before = idle_before_run(cfg.wait_idle_s, cfg.idle_cores)
    meter.start()
    profiler = (Profiler.start(meter.serve_pid, Path(cfg.profile_dir) / "front.txt", log_dir, cfg.profile_rate_hz,
                               cfg.profile_native)
                if cfg.profile_dir else None)
    try:
        bench = run_bench(argv, log_dir, "bench-stream", cfg.run_timeout_s)
    finally:
        cpu = meter.stop()
        profile = profiler.stop(cfg.profile_top_n) if profiler else None
    m = bench.metrics
    row = front_row("stream", cpu, int(m["total_output_tokens"]), float(m["duration_s"]), bench.client_cpu_s, m)
    row["busy_cores_before"] = idle_before
    if profile is not None:
        row["profile"] = profile
    return row


def front_unstreamed_run(cfg: FrontConfig, base_url: str, model: str | None, meter: Meter) -> dict[str, Any]:
    """The non-streamed run: the in-process client, whose CPU is this process's."""
    idle_before = idle_before_run(cfg.wait_idle_s, cfg.idle_cores)
    meter.start()
    run = send_requests(base_url, model, cfg.workload, False, cfg.run_timeout_s)
    cpu = meter.stop()
    row = front_row("no-stream", cpu, run.output_tokens, run.wall_s, 0.0, None)
    row["busy_cores_before"] = idle_before
    row["failed"] = run.failed
    return row


def serve_argv(port: int, server_args: tuple[str, ...]) -> list[str]:
    return python_module("pdserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                         "--skip-server-warmup", *server_args)


def run_front(cfg: FrontConfig) -> dict[str, Any]:
    """Every mode of ``cfg`` against one instance; the JSON document of the figures."""
    log_dir = prepare_dirs(cfg, "front")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    rows = []
    with running("serve", serve_argv(port, cfg.server_args), log_dir) as serve:
        wait_healthy(serve, base_url + "/health", cfg.startup_timeout_s)
        model = first_model(base_url)
        warm_up(base_url, model, cfg.workload, cfg.run_timeout_s)
        meter = Meter(serve.proc.pid, cfg.engine_mark)
        for mode in cfg.modes:
            log(f"front: {mode} run")
            if mode == "stream":
                rows.append(front_stream_run(cfg, base_url, meter, log_dir))
            else:
                rows.append(front_unstreamed_run(cfg, base_url, model, meter))
        pids = {"serve": serve.proc.pid, "front": meter.front, "engine": meter.engine,
                "cmdlines": {pid: proc_cmdline(pid) for pid in meter.front + meter.engine}}
    return {"kind": "front", "config": asdict(cfg), "processes": pids, "cpu_count": os.cpu_count(),
            "environment": environment(), "log_dir": str(log_dir), "runs": rows}
