"""PD disaggregation against colocated serving on the same hardware.

1. Start colocated instances behind the router (``pdserve up --num-prefill 0
   --num-decode 0 --num-colocated N``), wait for the router's ``/health``.
2. Run every traffic scenario at every request rate with the benchmark client.
3. Stop the cluster; start P prefill + D decode instances behind the router
   (``pdserve up --num-prefill P --num-decode D``, P + D = N) and run the same.
4. Write ``comparison.md``, ``comparison.json`` and ``comparison.png`` (TTFT and
   ITL p50/p99, goodput under the SLO, per mode, scenario and rate), plus each
   mode's full benchmark JSON and cluster log.

Requests are sent with ``ignore_eos`` so every request produces exactly the
scenario's output length in both modes. ``--smoke`` scales everything down for a
CPU run of the built-in tiny model.

Example::

    python -m pdserve.benchmarks.pd_vs_colocated --model-path /models/llama-8b \\
        --num-gpus 8 --layout 3:5 --request-rates 1 2 4 8 --num-prompts 400 \\
        -- --mem-fraction-static 0.85
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.benchmarks.backends import BACKENDS
from pdserve.benchmarks.bench_serving import BenchConfig, run_benchmark
from pdserve.benchmarks.metrics import parse_slo
from pdserve.benchmarks.report import bench_json
from pdserve.benchmarks.scenarios import ScenarioError, parse_scenario
from pdserve.benchmarks.study_report import (
    MODES,
    StudyRow,
    comparison_json,
    comparison_markdown,
    comparison_text,
    study_curves,
    study_rows,
)
from pdserve.common.args import add_dataclass_args, config_from_args, flag

DEFAULT_LAUNCHER = f"{shlex.quote(sys.executable)} -m pdserve.cli up"


SMOKE = dict(
    model_path="tiny",
    num_gpus=2,
    scenarios=("D(64,8)", "D(16,16)", "N(48,16)/(8,2)"),
    request_rates=(2.0, 4.0),
    num_prompts=8,
    slo="ttft_ms=2000,itl_ms=200",
    warmup_requests=1,
    startup_timeout_s=120.0,
)
_SMOKE_HELP = "CPU preset: tiny model, " + ", ".join(f"{k}={v}" for k, v in SMOKE.items() if k != "model_path")


@dataclass(frozen=True)
class StudyConfig:
    model_path: str | None = field(default=None, metadata=flag(
        "model for both modes (default: pdserve up's; --smoke: tiny)"))
    num_gpus: int = field(default=2, metadata=flag("GPUs (instances) per mode"))
    layout: str | None = field(default=None, metadata=flag("PD split P:D or xPyD (default: half and half)"))
    scenarios: tuple[str, ...] = field(default=("D(2048,256)", "D(512,512)", "N(1024,512)/(256,128)"),
                                       metadata=flag("traffic scenarios", nargs="+"))
    request_rates: tuple[float, ...] = field(default=(1.0, 2.0, 4.0, 8.0), metadata=flag(
        "requests/s, Poisson arrivals; inf sends all at once", nargs="+"))
    num_prompts: int = field(default=200, metadata=flag("requests per run"))
    slo: str = field(default="ttft_ms=1000,itl_ms=25", metadata=flag("SLO for goodput"))
    extra_serve_args: tuple[str, ...] = field(default=(), metadata=flag(
        "passed after -- to pdserve up, one shell-quoted string (also: everything after this command's own --; "
        "default: none)", type=shlex.split))
    up_args: tuple[str, ...] = field(default=(), metadata=flag(
        "extra flags of pdserve up itself, one shell-quoted string, e.g. '--base-port 32000 --transfer-backend ucx' "
        "(default: none)", type=shlex.split))
    modes: tuple[str, ...] = field(default=MODES, metadata=flag("modes to run", nargs="+", choices=MODES))
    host: str = field(default="127.0.0.1", metadata=flag("router address"))
    port: int = field(default=30000, metadata=flag("router port"))
    launcher: str = field(default=DEFAULT_LAUNCHER, metadata=flag("command that starts a cluster"))
    output_dir: str = field(default="pd_vs_colocated", metadata=flag("tables, plot, raw JSON, cluster logs"))
    backend: str = field(default="openai", metadata=flag("API the benchmark client uses"))
    warmup_requests: int = field(default=2, metadata=flag("requests before each run"))
    seed: int = field(default=0, metadata=flag("seed of prompts and arrival times"))
    startup_timeout_s: float = field(default=900.0, metadata=flag("wait this long for the router's /health"))
    request_timeout_s: float = field(default=600.0, metadata=flag("a request not finished by then counts as failed"))
    smoke: bool = field(default=False, metadata=flag(_SMOKE_HELP))


def parse_layout(layout: str | None, num_gpus: int) -> tuple[int, int]:
    """``"P:D"`` or ``"xPyD"`` -> (P, D); both at least one and summing to ``num_gpus``."""
    if layout is None:
        num_prefill = max(1, num_gpus // 2)
        parsed = (num_prefill, num_gpus - num_prefill)
    else:
        match = re.fullmatch(r"(\d+):(\d+)|(\d+)P(\d+)D", layout.strip(), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"bad --layout {layout!r}; expected P:D (e.g. 1:1) or xPyD (e.g. 1P3D)")
        groups = [g for g in match.groups() if g is not None]
        parsed = (int(groups[0]), int(groups[1]))
    if min(parsed) < 1 or sum(parsed) != num_gpus:
        raise ValueError(f"layout {parsed[0]}P{parsed[1]}D needs >= 1 of each and {num_gpus} GPUs in all")
    return parsed


def up_command(cfg: StudyConfig, mode: str) -> list[str]:
    """The ``pdserve up`` command line of one mode; extra serve args go after ``--``."""
    if mode == "colocated":
        counts = (0, 0, cfg.num_gpus)
    else:
        counts = (*parse_layout(cfg.layout, cfg.num_gpus), 0)
    cmd = [*shlex.split(cfg.launcher), "--host", cfg.host, "--port", str(cfg.port),
           "--num-prefill", str(counts[0]), "--num-decode", str(counts[1]), "--num-colocated", str(counts[2])]
    if cfg.model_path:
        cmd += ["--model-path", cfg.model_path]
    cmd += list(cfg.up_args)
    return cmd + ["--", *cfg.extra_serve_args] if cfg.extra_serve_args else cmd


class Cluster:
    """A ``pdserve up`` process group, started on enter and stopped on exit."""

    def __init__(self, cmd: list[str], base_url: str, log_path: Path, startup_timeout_s: float) -> None:
        self.cmd, self.base_url, self.log_path = cmd, base_url, log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Cluster:
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.base_url}/health not 200 after {self.startup_timeout_s:g} s; see {self.log_path}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the whole group (the launcher and its servers), SIGKILL after ``grace_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        try:  # children that outlived the launcher
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def bench_config(cfg: StudyConfig, base_url: str) -> BenchConfig:
    return BenchConfig(
        base_url=base_url, backend=cfg.backend, num_prompts=cfg.num_prompts,
        traffic_scenarios=cfg.scenarios, request_rates=cfg.request_rates, ignore_eos=True,
        slo=cfg.slo, warmup_requests=cfg.warmup_requests, seed=cfg.seed,
        request_timeout_s=cfg.request_timeout_s, disable_tqdm=True,
    )


def run_mode(cfg: StudyConfig, mode: str, out_dir: Path) -> list[StudyRow]:
    """Start the cluster of ``mode``, benchmark it, stop it; one row per run."""
    base_url = f"http://{cfg.host}:{cfg.port}"
    if not port_free(cfg.host, cfg.port):
        # A server already there would answer /health and be benchmarked instead.
        raise RuntimeError(f"{cfg.host}:{cfg.port} is in use; pick another --port")
    cmd = up_command(cfg, mode)
    print(f"[{mode}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    bcfg = bench_config(cfg, base_url)
    with Cluster(cmd, base_url, out_dir / f"{mode}.log", cfg.startup_timeout_s):
        outcome = asyncio.run(run_benchmark(bcfg))
    doc = bench_json({**dataclasses.asdict(bcfg), "mode": mode, "model": outcome.model}, outcome.results, False)
    (out_dir / f"bench_{mode}.json").write_text(json.dumps(doc, indent=2))
    return study_rows(mode, outcome.results)


def write_outputs(cfg: StudyConfig, rows: list[StudyRow], out_dir: Path) -> None:
    from pdserve.benchmarks import plot

    (out_dir / "comparison.md").write_text(comparison_markdown(rows, cfg.slo))
    num_prefill, num_decode = parse_layout(cfg.layout, cfg.num_gpus)
    config = {**dataclasses.asdict(cfg), "layout": f"{num_prefill}P{num_decode}D"}
    (out_dir / "comparison.json").write_text(json.dumps(comparison_json(rows, config), indent=2))
    print(comparison_text(rows))
    if plot.plot_available():
        grid, inf_x = study_curves(rows)
        title = f"PD ({config['layout']}) vs colocated ({cfg.num_gpus}), SLO {cfg.slo}"
        plot.plot_grid(grid, "request rate (req/s)", str(out_dir / "comparison.png"), title, inf_x)
    else:
        print(f"warning: {plot.MISSING_MATPLOTLIB}", file=sys.stderr)
    print(f"wrote {out_dir}/comparison.md, comparison.json, comparison.png", file=sys.stderr)


def run_study(cfg: StudyConfig) -> list[StudyRow]:
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[StudyRow] = []
    for mode in cfg.modes:
        rows += run_mode(cfg, mode, out_dir)
    write_outputs(cfg, rows, out_dir)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.pd_vs_colocated",
                                description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, StudyConfig, choices={"backend": BACKENDS.names()})
    return p


def _explicit(argv: list[str]) -> set[str]:
    """Fields the command line sets itself."""
    return {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def config_from_argv(argv: list[str]) -> StudyConfig:
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    cfg = config_from_args(StudyConfig, parser.parse_args(own))
    cfg = dataclasses.replace(cfg, extra_serve_args=(*cfg.extra_serve_args, *extra))
    if cfg.smoke:  # the preset fills what the command line left unsaid
        explicit = _explicit(own)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in SMOKE.items() if k not in explicit})
    try:
        validate(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    return cfg


def validate(cfg: StudyConfig) -> None:
    parse_layout(cfg.layout, cfg.num_gpus)
    parse_slo(cfg.slo)
    for text in cfg.scenarios:
        try:
            parse_scenario(text)
        except ScenarioError as exc:
            raise ValueError(str(exc)) from None
    if any(not r > 0 for r in cfg.request_rates):
        raise ValueError("--request-rates must be positive")


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        run_study(cfg)
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        print(f"pd_vs_colocated: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
