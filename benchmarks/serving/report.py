"""The figures of ``serving_cost`` as text tables and JSON.

The JSON holds every figure with the configuration and the environment they
depend on (code revision, package versions); the tables on stdout hold the
quotable few.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pdserve.benchmarks.serving.procs import log

ENV_PACKAGES = ("torch", "uvicorn", "uvloop", "httptools", "starlette", "fastapi", "httpx", "aiohttp",
                "sglang-router")
REPO_ROOT = Path(__file__).resolve().parents[2]
GIT_TIMEOUT_S = 30


def align(rows: list[list[str]], header: list[str], left: tuple[int, ...] = (0,)) -> str:
    """Columns padded to their widest cell; those in ``left`` left-aligned, the rest right."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def per_token_us(cpu_s: float, tokens: int) -> float | None:
    """CPU microseconds per token; None when no token came."""
    return 1e6 * cpu_s / tokens if tokens else None


def stat_ms(metrics: dict[str, Any], key: str, stat: str = "median") -> float | None:
    """One statistic of a ``pdserve bench`` latency (``itl_ms``, ``tpot_ms``, ...), or None."""
    value = metrics.get(key)
    return value.get(stat) if isinstance(value, dict) else None


def front_table(doc: dict[str, Any]) -> str:
    """CPU per token of the front and the engine, one row per mode."""
    w = doc["config"]["workload"]
    header = ["mode", "tokens", "wall s", "tok/s", "front us/tok", "engine us/tok", "front cores",
              "engine cores", "client cores", "other cores", "busy cores", "ITL p50 ms", "TPOT p50 ms"]
    rows = [[r["mode"], str(r["output_tokens"]), num(r["wall_s"], 2), num(r["tokens_per_s"], 0),
             num(r["front_cpu_us_per_token"]), num(r["engine_cpu_us_per_token"]), num(r["front_cores"], 2),
             num(r["engine_cores"], 2), num(r["client_cores"], 2), num(r["other_cores"], 2),
             num(r["machine_busy_cores"], 2), num(r.get("itl_p50_ms"), 2), num(r.get("tpot_p50_ms"), 2)]
            for r in doc["runs"]]
    title = (f"front CPU cost: c={w['concurrency']} in={w['input_len']} out={w['output_len']} "
             f"prompts={w['num_prompts']} ({doc['cpu_count']} cores; other: processes not part of the run)")
    return title + "\n" + align(rows, header)


def router_table(doc: dict[str, Any]) -> str:
    """CPU per relayed token and added latency of each router, then the pdserve/sglang ratios."""
    w, c = doc["config"]["workload"], doc["config"]
    header = ["target", "tokens", "tok/s", "router us/tok", "upstream us/tok", "router cores", "other cores",
              "ITL p50", "ITL p99", "TPOT p50", "added ITL p50", "delay p50", "delay p99", "added delay p50"]
    rows = [[r["target"], str(r["output_tokens"]), num(r["tokens_per_s"], 0), num(r["router_cpu_us_per_token"]),
             num(r["upstream_cpu_us_per_token"]), num(r["router_cores"], 2), num(r["other_cores"], 2),
             num(r["itl_p50_ms"], 3), num(r["itl_p99_ms"], 2), num(r["tpot_p50_ms"], 3),
             num(r.get("added_itl_p50_ms"), 3), num(r["relay_delay_p50_ms"], 3), num(r["relay_delay_p99_ms"], 2),
             num(r.get("added_relay_delay_p50_ms"), 3)] for r in doc["runs"]]
    title = (f"router relay cost: c={w['concurrency']} out={w['output_len']} prompts={w['num_prompts']}, "
             f"token interval {c['token_interval_ms']:g} ms, policy {c['policy']} ({doc['cpu_count']} cores); "
             "latencies in ms; delay: upstream write -> client read of one token")
    ratios = [f"{k}: {v:.2f}" for k, v in doc["comparison"].items()]
    return "\n".join([title, align(rows, header), *ratios])


def profile_table(profile: dict[str, Any], title: str) -> str:
    """The top functions of one profile, by inclusive and by own samples."""
    lines = [f"{title}: {profile['total_samples']} samples (non-idle)"]
    for key, label in (("top_inclusive", "by inclusive samples"), ("top_own", "by own samples")):
        rows = [[f"{r['inclusive_pct']:.1f}", f"{r['own_pct']:.1f}", r["function"]] for r in profile[key]]
        lines += ["", f"  {label}", align(rows, ["incl %", "own %", "function"], left=(2,))]
    return "\n".join(lines)


def print_report(doc: dict[str, Any]) -> None:
    """The measurement's table, then one table per recorded profile."""
    print(front_table(doc) if doc["kind"] == "front" else router_table(doc))
    for row in doc["runs"]:
        if "profile" in row:
            name = row.get("mode") or row.get("target")
            print("\n" + profile_table(row["profile"], f"py-spy profile ({doc['kind']} {name})"))


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=2))
        log(f"wrote {path}")


def environment() -> dict[str, Any]:
    """What the figures depend on besides the workload: code revision and key packages."""
    from importlib import metadata

    versions = {}
    for name in ENV_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "cpu_count": os.cpu_count(), "packages": versions,
            "git_head": _git(REPO_ROOT, "rev-parse", "HEAD"),
            "git_dirty_files": len((_git(REPO_ROOT, "status", "--porcelain") or "").splitlines())}


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args],
                             capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
