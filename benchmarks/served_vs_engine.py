"""Served throughput against the engine's own: does the HTTP path keep up with the GPU?

For each model shape (dummy weights) it measures, in one process tree:

1. the engine's decode rate: ``batch / step`` from the roofline loop
   (``benchmarks/roofline.py``) at each batch and at the context the served
   run averages (input + output / 2);
2. the served rate: ``pdserve serve`` on the GPU, then ``pdserve bench``
   (streaming, one SSE chunk per token, ``ignore_eos``) with as many prompts as
   the concurrency, so one wave runs; the CPU time of the front and the engine
   processes is read from ``/proc`` around it;
3. the same through ``pdserve up`` (router in front of one colocated instance).

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from pdserve.common.args import add_dataclass_args, config_from_args, flag


@dataclass(frozen=True)
class StudyConfig:
    models: tuple[str, ...] = field(default=("llama-3.1-8b", "llama-3.2-1b"), metadata=flag(
        "benchmark config names (benchmarks/configs/NAME.json)", nargs="+"))
    concurrency: tuple[int, ...] = field(default=(128, 256), metadata=flag("concurrencies (= batches)", nargs="+", type=int))
    input_len: int = field(default=512, metadata=flag("prompt tokens"))
    output_len: int = field(default=512, metadata=flag("output tokens (ignore_eos)"))
    attention_backend: str = field(default="triton", metadata=flag("attention backend of engine and server"))
    port: int = field(default=30000, metadata=flag("first port used; a few above it too"))
    output_dir: str = field(default="served-vs-engine", metadata=flag("logs, bench JSONs and the summary"))
    skip_up: bool = field(default=False, metadata=flag("do not measure through pdserve up"))
    startup_timeout_s: float = field(default=600.0, metadata=flag("seconds a server may take to become healthy"))
    profile_s: float = field(default=0.0, metadata=flag(
        "record py-spy profiles (raw stacks) of every measured process for this many seconds of each run"))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime, stime in clock ticks (USER_HZ = 100)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def engine_rates(cfg: StudyConfig, model: str, out_dir: Path) -> dict[int, dict]:
    """``{batch: {"step_s", "tokens_per_s"}}`` from the roofline loop, in a process of its own."""
    context = cfg.input_len + cfg.output_len // 2
    out = out_dir / f"roofline-{model}.json"
    cmd = [sys.executable, "-m", "pdserve.benchmarks.roofline", "--models", model,
           "--decode-batches", *map(str, cfg.concurrency), "--decode-context", str(context),
           "--prefill-lengths", str(cfg.input_len), "--skip-transfer",
           "--attention-backend", cfg.attention_backend, "--output-json", str(out)]
    subprocess.run(cmd, check=True)
    rows = json.loads(out.read_text())["models"][0]["rows"]
    return {r["batch"]: {"step_s": r["step_s"], "tokens_per_s": r["batch"] / r["step_s"], "context": r["context"]}
            for r in rows if r["kind"] == "decode"}


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} not healthy within {timeout_s:.0f} s")


def serve_argv(cfg: StudyConfig, model: str) -> list[str]:
    batch = max(cfg.concurrency)
    return ["--model-path", model, "--load-format", "dummy", "--dtype", "bfloat16",
            "--attention-backend", cfg.attention_backend, "--max-running-requests", str(batch),
            "--cuda-graph-max-bs", str(batch), "--context-length", str(cfg.input_len + cfg.output_len + 64)]


def decode_window_rate(requests: list[dict], share: float = 0.9) -> dict:
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


def bench(cfg: StudyConfig, url: str, concurrency: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--backend", "openai",
           "--dataset", "random-ids", "--random-input-len", str(cfg.input_len),
           "--random-output-len", str(cfg.output_len), "--num-prompts", str(concurrency),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--disable-tqdm", "--warmup-requests", "2",
           "--output-json", str(out), "--output-details"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    run = json.loads(out.read_text())["runs"][0]
    m = run["metrics"]
    return {"output_tokens": m["total_output_tokens"], "output_tokens_per_s": m["output_throughput"],
            "tpot_p50_ms": m["tpot_ms"]["median"], "itl_p50_ms": m["itl_ms"]["median"],
            "failed": m["failed"], "decode_window": decode_window_rate(run["requests"])}


def measured(cfg: StudyConfig, url: str, pids: dict[str, list[int]], concurrency: int, out: Path) -> dict:
    """One bench run with the CPU seconds each named group of processes spent meanwhile."""
    before = {name: sum(_cpu_s(p) for p in group) for name, group in pids.items()}
    profilers = _profile(cfg, pids, out) if cfg.profile_s > 0 else []
    result = bench(cfg, url, concurrency, out)
    for profiler in profilers:
        profiler.wait()
    spent = {name: sum(_cpu_s(p) for p in group) - before[name] for name, group in pids.items()}
    result["cpu_us_per_token"] = {name: s * 1e6 / max(result["output_tokens"], 1) for name, s in spent.items()}
    return result


def _profile(cfg: StudyConfig, pids: dict[str, list[int]], out: Path) -> list[subprocess.Popen]:
    """py-spy on each measured process, started with the run (the wave's prefill comes first)."""
    return [subprocess.Popen(["py-spy", "record", "-d", str(int(cfg.profile_s)), "-r", "200", "-f", "raw", "--nonblocking",
                              "-o", str(out.with_suffix(f".{name}{i}.txt")), "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, group in pids.items() for i, pid in enumerate(group)]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def served_runs(cfg: StudyConfig, model: str, out_dir: Path, through_up: bool) -> dict[int, dict]:
    port = cfg.port + (10 if through_up else 0)
    log = open(out_dir / f"{'up' if through_up else 'serve'}-{model}.log", "w")  # noqa: SIM115 - closed below
    if through_up:
        argv = [sys.executable, "-m", "pdserve.cli", "up", "--num-colocated", "1", "--port", str(port),
                "--bootstrap-port", str(port + 1), "--base-port", str(port + 2), "--model-path", model,
                "--startup-timeout-s", str(cfg.startup_timeout_s),
                "--", *serve_argv(cfg, model)[2:]]
    else:
        argv = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port), *serve_argv(cfg, model)]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, cfg.startup_timeout_s)
        pids = _process_groups(proc.pid, through_up)
        return {c: measured(cfg, url, pids, c, out_dir / f"bench-{'up' if through_up else 'serve'}-{model}-c{c}.json")
                for c in cfg.concurrency}
    finally:
        _stop(proc)
        log.close()


def _process_groups(root: int, through_up: bool) -> dict[str, list[int]]:
    """Front, engine (and router) processes, told apart by their command lines."""
    groups: dict[str, list[int]] = {"front": [], "engine": [], "router": []}
    for pid in [root, *_descendants(root)]:
        cmd = _cmdline(pid)
        if "multiprocessing" in cmd:
            groups["engine"].append(pid)
        elif " router" in cmd:
            groups["router"].append(pid)
        elif " serve" in cmd:
            groups["front"].append(pid)
    return {k: v for k, v in groups.items() if v}


def run(cfg: StudyConfig) -> dict:
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"config": asdict(cfg), "models": {}}
    for model in cfg.models:
        engine = engine_rates(cfg, model, out_dir)
        direct = served_runs(cfg, model, out_dir, through_up=False)
        up = {} if cfg.skip_up else served_runs(cfg, model, out_dir, through_up=True)
        summary["models"][model] = rows = {}
        for c in cfg.concurrency:
            rows[c] = _row(engine.get(c), direct[c], up.get(c))
            _print_row(model, c, rows[c])
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _row(engine: dict | None, direct: dict, up: dict | None) -> dict:
    row: dict = {"engine": engine, "direct": direct, "up": up}
    if engine:
        row["direct_vs_engine"] = direct["decode_window"]["tokens_per_s"] / engine["tokens_per_s"]
        row["tpot_p50_vs_engine_step"] = direct["tpot_p50_ms"] / (engine["step_s"] * 1e3)
    if up:
        row["up_vs_direct"] = up["decode_window"]["tokens_per_s"] / direct["decode_window"]["tokens_per_s"]
        row["up_output_vs_direct"] = up["output_tokens_per_s"] / direct["output_tokens_per_s"]
    return row


def _print_row(model: str, concurrency: int, row: dict) -> None:
    d = row["direct"]
    parts = [f"{model} c={concurrency}: served decode {d['decode_window']['tokens_per_s']:.0f} tok/s",
             f"output {d['output_tokens_per_s']:.0f} tok/s", f"TPOT p50 {d['tpot_p50_ms']:.2f} ms",
             f"front {d['cpu_us_per_token'].get('front', 0):.1f} us/token"]
    if row.get("engine"):
        parts.append(f"engine {row['engine']['tokens_per_s']:.0f} tok/s -> {row['direct_vs_engine']:.2f}, "
                     f"TPOT/step {row['tpot_p50_vs_engine_step']:.2f}")
    if row.get("up"):
        parts.append(f"through pdserve up {row['up_vs_direct']:.2f} of direct")
    print("; ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.served_vs_engine",
                                     description="Served throughput against the engine's own decode rate (GPU).")
    add_dataclass_args(parser, StudyConfig)
    run(config_from_args(StudyConfig, parser.parse_args(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
