"""The configurations of ``serving_cost``: frozen dataclasses that are also its flags.

``front`` and ``router`` share the workload (what ``pdserve bench`` sends) and
the run options (timeouts, profiling, waiting for a quiet machine, where
figures and logs go); each adds what only it needs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.benchmarks.serving.cpu import ENGINE_CMDLINE_MARK
from pdserve.common.args import flag

FRONT_MODES = ("stream", "no-stream")
ROUTER_TARGETS = ("direct", "pdserve", "sglang", "pdserve-pd", "sglang-pd")


@dataclass(frozen=True)
class Workload:
    """What one measured run sends: random prompts, fixed output lengths (``ignore_eos``)."""

    input_len: int = field(default=64, metadata=flag("prompt tokens"))
    output_len: int = field(default=256, metadata=flag("output tokens per request (ignore_eos)"))
    num_prompts: int = field(default=256, metadata=flag("requests per run"))
    concurrency: int = field(default=64, metadata=flag("requests in flight"))
    seed: int = field(default=0, metadata=flag("seed of the random prompts"))


@dataclass(frozen=True)
class MeasureConfig:
    """What every ``serving_cost`` measurement takes."""

    workload: Workload = field(default=Workload(), metadata=flag("", nested=True))
    run_timeout_s: float = field(default=900.0, metadata=flag("limit of one measured run"))
    profile_dir: str | None = field(default=None, metadata=flag(
        "also record py-spy profiles (raw collapsed stacks) here"))
    profile_top_n: int = field(default=25, metadata=flag("functions listed per profile table"))
    profile_rate_hz: int = field(default=100, metadata=flag("py-spy samples per second"))
    profile_native: bool = field(default=False, metadata=flag(
        "include C frames (py-spy --native; pauses the process at each sample)"))
    wait_idle_s: float = field(default=0.0, metadata=flag(
        "before each run, wait up to this long for other processes to leave the CPU"))
    idle_cores: float = field(default=0.3, metadata=flag("busy cores that count as idle"))
    output_json: str | None = field(default=None, metadata=flag("write every figure to this file"))
    log_dir: str | None = field(default=None, metadata=flag("child logs and bench JSONs (default: a new temp dir)"))


@dataclass(frozen=True)
class FrontConfig(MeasureConfig):
    """``serving_cost front``: one ``pdserve serve`` instance, its front and engine apart."""

    modes: tuple[str, ...] = field(default=FRONT_MODES, metadata=flag(
        "streamed (pdserve bench) and non-streamed (in-process client) runs", nargs="+", choices=FRONT_MODES))
    server_args: tuple[str, ...] = field(default=(), metadata=flag(
        "extra `pdserve serve` flags, after --", positional=True, nargs="*"))
    engine_mark: str = field(default=ENGINE_CMDLINE_MARK, metadata=flag(
        "a child of serve whose command line holds this is the engine"))
    startup_timeout_s: float = field(default=600.0, metadata=flag("seconds the instance may take to become healthy"))


@dataclass(frozen=True)
class RouterBenchConfig(MeasureConfig):
    """``serving_cost router``: each router in turn in front of the fake upstream."""

    targets: tuple[str, ...] = field(default=ROUTER_TARGETS, metadata=flag(
        "direct: no router (baseline); *-pd: the fake plays prefill and decode", nargs="+", choices=ROUTER_TARGETS))
    token_interval_ms: float = field(default=10.0, metadata=flag(
        "the fake upstream's token pace (concurrency / interval = offered tokens/s)"))
    probe_streams: int = field(default=1, metadata=flag("extra streams that time each token's delivery from the upstream"))
    policy: str = field(default="cache_aware", metadata=flag("routing policy of both routers"))
    max_tree_chars: int | None = field(default=None, metadata=flag(
        "pdserve router's --max-tree-chars (cache_aware's bound per worker; default: the router's); a small one "
        "puts the policy at its bound, where every routed request evicts, within a short run"))
    tokenizer: str | None = field(default=None, metadata=flag(
        "for pdserve bench's text prompts (default: built-in tiny)"))
    startup_timeout_s: float = field(default=120.0, metadata=flag(
        "seconds the fake upstream may take to become healthy, and each router to relay a completion"))


def prepare_dirs(cfg: MeasureConfig, kind: str) -> Path:
    """The log directory of a measurement (a new temp dir unless given), and the profile directory."""
    log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix=f"serving_cost_{kind}_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if cfg.profile_dir:
        Path(cfg.profile_dir).mkdir(parents=True, exist_ok=True)
    return log_dir
