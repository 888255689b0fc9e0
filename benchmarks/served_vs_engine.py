"""Served throughput against the engine's own: does the HTTP path keep up with the GPU?

For each model shape (dummy weights) it measures, in one process tree:

1. the engine's decode rate: ``batch / step`` from the roofline loop
   (``benchmarks/roofline.py``) at each batch and at the context the served
   run averages (input + output / 2);
2. the served rate: ``pdserve serve`` on the GPU, then ``pdserve bench``
   (streaming, one SSE chunk per token, ``ignore_eos``) with as many prompts as
   the concurrency, so one wave runs (``--waves`` of them, each with prompts of
   its own; the median is reported); the CPU time of the front and the engine
   processes is read from ``/proc`` around each;
3. the same through ``pdserve up`` (router in front of one colocated
   instance), once per ``--router-processes`` count (the router's
   ``--processes``); the last is reported as ``up``.

The served decode rate is counted where the wave is decoding as a whole: every
content chunk that arrived while at least 90% of the requests were between
their first token and their end, over the length of those intervals. Prefill
of the wave lies outside them, so the ratio to the engine's rate says what the
serving path costs, not what prefill costs. The whole run's output tokens per
second and TPOT p50 are reported beside it.

    python -m pdserve.benchmarks.served_vs_engine --models llama-3.1-8b llama-3.2-1b \\
        --concurrency 128 256 --output-dir /tmp/sve
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.benchmarks.serving.bench_runs import bench_argv, run_bench
from pdserve.benchmarks.serving.config import Workload
from pdserve.benchmarks.serving.cpu import CpuSnapshot, proc_cmdline, proc_parents, process_tree
from pdserve.benchmarks.serving.procs import python_module, run_guarded, running, wait_healthy
from pdserve.benchmarks.serving.profiles import Profiler
from pdserve.common.args import add_dataclass_args, config_from_args, flag

BENCH_WARMUP_REQUESTS = 2
RUN_TIMEOUT_S = 3600.0
HEALTH_POLL_S = 1.0
STOP_GRACE_S = 30.0
PROFILE_RATE_HZ = 200
DECODING_SHARE = 0.9


@dataclass(frozen=True)
class StudyConfig:
    """The models and waves to measure, and where the servers listen and write."""

    models: tuple[str, ...] = field(default=("llama-3.1-8b", "llama-3.2-1b"), metadata=flag(
        "benchmark config names (benchmarks/configs/NAME.json)", nargs="+"))
    concurrency: tuple[int, ...] = field(default=(128, 256), metadata=flag("concurrencies (= batches)", nargs="+", type=int))
    input_len: int = field(default=512, metadata=flag("prompt tokens"))
    output_len: int = field(default=512, metadata=flag("output tokens (ignore_eos)"))
    attention_backend: str = field(default="triton", metadata=flag("attention backend of engine and server"))
    port: int = field(default=30000, metadata=flag("first port used; a few above it too"))
    output_dir: str = field(default="served-vs-engine", metadata=flag("logs, bench JSONs and the summary"))
    waves: int = field(default=3, metadata=flag(
        "waves per concurrency and server; the one with the median decode-window rate is reported"))
    skip_up: bool = field(default=False, metadata=flag("do not measure through pdserve up"))
    router_processes: tuple[int, ...] = field(default=(1,), metadata=flag(
        "router --processes of the pdserve up runs, one run each; the last is reported as 'up'", nargs="+", type=int))
    startup_timeout_s: float = field(default=600.0, metadata=flag("seconds a server may take to become healthy"))
    profile_s: float = field(default=0.0, metadata=flag(
        "record py-spy profiles (raw stacks) of every measured process for this many seconds of each run"))


def engine_rates(cfg: StudyConfig, model: str, out_dir: Path) -> dict[int, dict]:
    """``{batch: {"step_s", "tokens_per_s"}}`` from the roofline loop, in a process of its own."""
    context = cfg.input_len + cfg.output_len // 2
    out = out_dir / f"roofline-{model}.json"
    cmd = python_module("pdserve.benchmarks.roofline", "--models", model,
                        "--decode-batches", *map(str, cfg.concurrency), "--decode-context", str(context),
                        "--prefill-lengths", str(cfg.input_len), "--skip-transfer",
                        "--attention-backend", cfg.attention_backend, "--output-json", str(out))
    subprocess.run(cmd, check=True)
    rows = json.loads(out.read_text())["models"][0]["rows"]
    return {r["batch"]: {"step_s": r["step_s"], "tokens_per_s": r["batch"] / r["step_s"], "context": r["context"]}
            for r in rows if r["kind"] == "decode"}


def serve_argv(cfg: StudyConfig, model: str) -> list[str]:
    batch = max(cfg.concurrency)
    return ["--model-path", model, "--load-format", "dummy", "--dtype", "bfloat16",
            "--attention-backend", cfg.attention_backend, "--max-running-requests", str(batch),
            "--cuda-graph-max-bs", str(batch), "--context-length", str(cfg.input_len + cfg.output_len + 64)]


def decode_window_rate(requests: list[dict], share: float = DECODING_SHARE) -> dict:
    """Tokens per second while at least ``share`` of the wave is decoding.

    A request decodes from its first streamed token to its end. Prefill of the
    wave and its ragged tail lie outside these intervals, so the rate is the
    serving path's at (nearly) the full batch.
    """
    ok = [r for r in requests if r["success"] and r["chunk_times_s"]]
    edges = sorted([(r["start_s"] + r["chunk_times_s"][0], 1) for r in ok] + [(r["start_s"] + r["e2e_s"], -1) for r in ok])
    need, active, intervals, opened = share * len(ok), 0, [], None
    for at, step in edges:
        active += step
        if active >= need and opened is None:
            opened = at
        elif active < need and opened is not None:
            intervals.append((opened, at))
            opened = None
    tokens = sum(n for r in ok for t, n in zip(r["chunk_times_s"], r["chunk_tokens"])
                 if any(a < r["start_s"] + t <= b for a, b in intervals))
    window_s = sum(b - a for a, b in intervals)
    return {"window_s": window_s, "tokens": tokens, "tokens_per_s": tokens / window_s if window_s > 0 else 0.0,
            "share": share}


def bench(cfg: StudyConfig, url: str, concurrency: int, out: Path, seed: int) -> dict:
    """One wave of ``concurrency`` streamed requests; throughput, latencies and the decode-window rate."""
    workload = Workload(cfg.input_len, cfg.output_len, concurrency, concurrency, seed=seed)
    argv = bench_argv(url, out, workload, ["--dataset", "random-ids"],
                      warmup_requests=BENCH_WARMUP_REQUESTS, details=True)
    run = run_bench(argv, out.parent, out.stem, RUN_TIMEOUT_S)
    m = run.metrics
    return {"output_tokens": m["total_output_tokens"], "output_tokens_per_s": m["output_throughput"],
            "tpot_p50_ms": m["tpot_ms"]["median"], "itl_p50_ms": m["itl_ms"]["median"],
            "failed": m["failed"], "decode_window": decode_window_rate(run.requests)}


def measured(cfg: StudyConfig, url: str, pids: dict[str, list[int]], concurrency: int, out: Path, seed: int) -> dict:
    """One bench run with the CPU seconds each named group of processes spent meanwhile."""
    before = {name: CpuSnapshot.take(group) for name, group in pids.items()}
    profilers = _profile(cfg, pids, out) if cfg.profile_s > 0 else []
    result = bench(cfg, url, concurrency, out, seed)
    for profiler in profilers:
        profiler.wait()
    spent = {name: CpuSnapshot.take(group).since(before[name]) for name, group in pids.items()}
    result["cpu_us_per_token"] = {name: s * 1e6 / max(result["output_tokens"], 1) for name, s in spent.items()}
    return result


def _profile(cfg: StudyConfig, pids: dict[str, list[int]], out: Path) -> list[Profiler]:
    """py-spy on each measured process, started with the run (the wave's prefill comes first)."""
    return [Profiler.start(pid, out.with_suffix(f".{name}{i}.txt"), out.parent, PROFILE_RATE_HZ,
                           duration_s=int(cfg.profile_s))
            for name, group in pids.items() for i, pid in enumerate(group)]


def served_runs(cfg: StudyConfig, model: str, out_dir: Path, router_processes: int = 0) -> dict[int, dict]:
    """Every concurrency against one ``pdserve serve`` of ``model``, or with
    ``router_processes`` one ``pdserve up`` whose router runs that many processes."""
    port = cfg.port + (10 if router_processes else 0)
    if router_processes:
        argv = python_module("pdserve.cli", "up", "--num-colocated", "1", "--port", str(port),
                             "--bootstrap-port", str(port + 1), "--base-port", str(port + 2), "--model-path", model,
                             "--startup-timeout-s", str(cfg.startup_timeout_s),
                             "--router-args", f"--processes {router_processes}",
                             "--", *serve_argv(cfg, model)[2:])
    else:
        argv = python_module("pdserve.cli", "serve", "--port", str(port), *serve_argv(cfg, model))
    kind = f"up-r{router_processes}" if router_processes else "serve"
    url = f"http://127.0.0.1:{port}"
    with running(f"{kind}-{model}", argv, out_dir, STOP_GRACE_S) as server:
        wait_healthy(server, url + "/health", cfg.startup_timeout_s, HEALTH_POLL_S)
        parents = proc_parents()
        pids = group_processes({pid: proc_cmdline(pid) for pid in process_tree(server.proc.pid)}, parents)
        return {c: median_wave([measured(cfg, url, pids, c, out_dir / f"bench-{kind}-{model}-c{c}-w{w}.json",
                                         seed=wave_seed(c, w))
                                for w in range(cfg.waves)])
                for c in cfg.concurrency}


def wave_seed(concurrency: int, wave: int) -> int:
    """A prompt seed per wave: an earlier wave's prompts on the same server would
    be prefix-cache hits and make this wave's prefill nearly free."""
    return concurrency * 1000 + wave


def median_wave(waves: list[dict]) -> dict:
    """The wave with the median decode-window rate (a wave of a small model
    decodes for a second or two, so one wave's rate moves by several percent),
    with every wave's rate and TPOT p50 beside it."""
    ranked = sorted(waves, key=lambda w: w["decode_window"]["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2],
            "waves": [{"decode_tokens_per_s": w["decode_window"]["tokens_per_s"], "tpot_p50_ms": w["tpot_p50_ms"]}
                      for w in waves]}


def group_processes(cmdlines: dict[int, str], parents: dict[int, int] | None = None) -> dict[str, list[int]]:
    """Front, engine (and router) processes, told apart by their command lines;
    a spawned child is the engine unless its parent (``parents``) is a router,
    whose ``--processes`` it is. Empty groups left out."""
    parents = parents or {}
    groups: dict[str, list[int]] = {"front": [], "engine": [], "router": []}
    for pid, cmd in cmdlines.items():
        if "multiprocessing" in cmd:
            router_child = " router" in cmdlines.get(parents.get(pid, -1), "")
            groups["router" if router_child else "engine"].append(pid)
        elif " router" in cmd:
            groups["router"].append(pid)
        elif " serve" in cmd:
            groups["front"].append(pid)
    return {k: v for k, v in groups.items() if v}


def run(cfg: StudyConfig) -> dict:
    """Engine rate, served rate and (unless skipped) the rate through ``pdserve up``, per model and concurrency."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"config": asdict(cfg), "models": {}}
    for model in cfg.models:
        engine = engine_rates(cfg, model, out_dir)
        direct = served_runs(cfg, model, out_dir)
        ups = {} if cfg.skip_up else {n: served_runs(cfg, model, out_dir, n) for n in cfg.router_processes}
        summary["models"][model] = rows = {}
        for c in cfg.concurrency:
            rows[c] = comparison_row(engine.get(c), direct[c], {n: up[c] for n, up in ups.items()})
            _print_row(model, c, rows[c])
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def comparison_row(engine: dict | None, direct: dict, ups: dict[int, dict]) -> dict:
    """``ups``: the pdserve up run of each router process count; the last is ``up``."""
    up = ups[list(ups)[-1]] if ups else None
    row: dict = {"engine": engine, "direct": direct, "up": up}
    if engine:
        row["direct_vs_engine"] = direct["decode_window"]["tokens_per_s"] / engine["tokens_per_s"]
        row["tpot_p50_vs_engine_step"] = direct["tpot_p50_ms"] / (engine["step_s"] * 1e3)
    if up:
        row["up_router_processes"] = list(ups)[-1]
        row["up_vs_direct"] = up["decode_window"]["tokens_per_s"] / direct["decode_window"]["tokens_per_s"]
        row["up_output_vs_direct"] = up["output_tokens_per_s"] / direct["output_tokens_per_s"]
    if len(ups) > 1:
        row["up_vs_direct_by_router_processes"] = {
            n: run["decode_window"]["tokens_per_s"] / direct["decode_window"]["tokens_per_s"] for n, run in ups.items()}
        row["up_runs"] = {n: {k: v for k, v in run.items() if k != "waves"} for n, run in ups.items()}
    return row


def _print_row(model: str, concurrency: int, row: dict) -> None:
    d = row["direct"]
    parts = [f"{model} c={concurrency}: served decode {d['decode_window']['tokens_per_s']:.0f} tok/s",
             f"output {d['output_tokens_per_s']:.0f} tok/s", f"TPOT p50 {d['tpot_p50_ms']:.2f} ms",
             f"front {d['cpu_us_per_token'].get('front', 0):.1f} us/token"]
    if row.get("engine"):
        parts.append(f"engine {row['engine']['tokens_per_s']:.0f} tok/s -> {row['direct_vs_engine']:.2f}, "
                     f"TPOT/step {row['tpot_p50_vs_engine_step']:.2f}")
    for n, ratio in row.get("up_vs_direct_by_router_processes", {}).items():
        parts.append(f"up with {n} router processes {ratio:.2f} of direct")
    if row.get("up"):
        parts.append(f"through pdserve up ({row['up_router_processes']} router processes) "
                     f"{row['up_vs_direct']:.2f} of direct")
    print("; ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.served_vs_engine",
                                     description="Served throughput against the engine's own decode rate (GPU).")
    add_dataclass_args(parser, StudyConfig)
    cfg = config_from_args(StudyConfig, parser.parse_args(argv))
    return run_guarded(lambda: run(cfg))[1]


if __name__ == "__main__":
    sys.exit(main())
