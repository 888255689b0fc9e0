"""The HTTP front alone, fed by a stand-in engine as fast as a GPU.

A real engine on a CPU makes a few hundred tokens a second, far too few to
load a front; on a GPU the front must stream tens of thousands. This runs the
real ``pdserve serve`` front (routes, detokenizer, SSE, the engine pipe and
its messages) against ``token_engine_main`` (``benchmarks/serving/token_engine.py``):
a process that speaks the engine's protocol and gives every running request
one token per ``--step-ms``, like a decode batch. ``pdserve bench`` is the
client; the front's CPU time per streamed token (the ``serve`` process; the
stand-in engine is its child and not counted) is read from ``/proc``.

    python -m pdserve.benchmarks.front_alone --concurrency 64 --output-len 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.benchmarks.serving.bench_runs import BenchRun, bench_argv, run_bench
from pdserve.benchmarks.serving.config import Workload
from pdserve.benchmarks.serving.cpu import CpuSnapshot
from pdserve.benchmarks.serving.procs import python_module, run_guarded, running, wait_healthy
from pdserve.common.args import add_dataclass_args, config_from_args, flag

STARTUP_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 900.0
HEALTH_POLL_S = 0.5
STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class StandInWorkload(Workload):
    """The workload with longer outputs: the stand-in makes tokens as fast as a GPU."""

    output_len: int = field(default=512, metadata=flag("tokens per request (ignore_eos)"))


@dataclass(frozen=True)
class FrontAloneConfig:
    """The measured run (concurrency = the stand-in's batch) and the stand-in engine's pace."""

    workload: StandInWorkload = field(default=StandInWorkload(), metadata=flag("", nested=True))
    step_ms: float = field(default=2.0, metadata=flag("the stand-in engine's step: one token per running request"))
    port: int = field(default=31900, metadata=flag("the front's port"))
    output_json: str | None = field(default=None, metadata=flag("write the figures here (default: print only)"))


def _bench(cfg: FrontAloneConfig, url: str, log_dir: Path, name: str, num_prompts: int) -> BenchRun:
    """``pdserve bench`` with ``num_prompts`` random-id prompts at the configured concurrency."""
    workload = dataclasses.replace(cfg.workload, num_prompts=num_prompts)
    argv = bench_argv(url, log_dir / f"{name}.json", workload, ["--dataset", "random-ids"])
    return run_bench(argv, log_dir, name, RUN_TIMEOUT_S)


def measure(cfg: FrontAloneConfig) -> dict[str, Any]:
    """One warm-up wave, then the measured run; the front's CPU per streamed token."""
    argv = python_module("pdserve.benchmarks.serving.token_engine", "--port", str(cfg.port),
                         "--step-ms", str(cfg.step_ms))
    url = f"http://127.0.0.1:{cfg.port}"
    with tempfile.TemporaryDirectory() as tmp, running("front", argv, Path(tmp), STOP_GRACE_S) as front:
        wait_healthy(front, url + "/health", STARTUP_TIMEOUT_S, HEALTH_POLL_S)
        _bench(cfg, url, Path(tmp), "warm", cfg.workload.concurrency)
        before = CpuSnapshot.take([front.proc.pid])
        metrics = _bench(cfg, url, Path(tmp), "run", cfg.workload.num_prompts).metrics
        front_s = CpuSnapshot.take([front.proc.pid]).since(before)
    tokens = metrics["total_output_tokens"]
    return {"config": dataclasses.asdict(cfg), "output_tokens": tokens, "front_cpu_s": front_s,
            "front_cpu_us_per_token": front_s * 1e6 / max(tokens, 1),
            "output_tokens_per_s": metrics["output_throughput"], "itl_p50_ms": metrics["itl_ms"]["median"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.front_alone",
                                     description="CPU per streamed token of the HTTP front, fed by a stand-in engine.")
    add_dataclass_args(parser, FrontAloneConfig)
    cfg = config_from_args(FrontAloneConfig, parser.parse_args(argv))
    result, status = run_guarded(lambda: measure(cfg))
    if result is None:
        return status
    print(f"front: {result['front_cpu_us_per_token']:.1f} us CPU per streamed token "
          f"({result['output_tokens']} tokens, {result['output_tokens_per_s']:.0f} tok/s, "
          f"ITL p50 {result['itl_p50_ms']:.2f} ms)")
    if cfg.output_json:
        Path(cfg.output_json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
