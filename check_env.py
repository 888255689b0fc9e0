"""``pdserve check-env``: what this machine offers pdserve, and whether KV transfer works here.

Prints the versions of Python and the packages pdserve runs on (torch, triton,
flashinfer, nixl, ucxx, transformers), CUDA and the driver, the GPUs, and runs a
loopback self-test per transfer backend: a prefill and a decode agent, each in
its own process on this machine, move a prompt's KV pages and the pages are
compared. It reports each backend's bandwidth, or why it is not available or
failed. ``--json`` prints the same as one JSON object. Exit status 1 when the
self-test of an installed backend failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pdserve.common.args import add_dataclass_args, config_from_args, flag
from pdserve.common.startup import one_line

# Package -> distribution names it ships under (CUDA builds add a suffix).
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton"),
    "flashinfer": ("flashinfer-python", "flashinfer"),
    "nixl": ("nixl", "nixl-cu12", "nixl-cu13"),
    "ucxx": ("ucxx", "ucxx-cu12", "ucxx-cu13"),
    "transformers": ("transformers",),
}
# A small model's KV: 4 layers, 8 KV heads of 128, bf16; 32 KiB per page per region.
SELF_TEST_LAYOUT = {"num_layers": 4, "page_size": 16, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}


@dataclass(frozen=True)
class CheckEnvConfig:
    json_output: bool = field(default=False, metadata=flag("print the report as one JSON object", flag="--json"))
    skip_transfer_test: bool = field(default=False, metadata=flag("skip the loopback transfer self-test"))
    transfer_test_tokens: int = field(default=1024, metadata=flag(
        "tokens of KV each backend's self-test moves (a 4-layer bf16 model, 16 MiB per 1024 tokens)"))
    transfer_test_repeats: int = field(default=3, metadata=flag("timed transfers per backend; the median is reported"))
    timeout_s: float = field(default=60.0, metadata=flag("seconds one transfer may take before the self-test fails"))


def package_versions() -> dict[str, str | None]:
    """Each package's installed version, None when it is not installed."""
    versions: dict[str, str | None] = {}
    for package, dists in PACKAGES.items():
        versions[package] = None
        for dist in dists:
            try:
                versions[package] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi, None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def cuda_facts() -> dict[str, Any]:
    """torch's CUDA build, the driver, and one entry per visible GPU."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "compute_capability": f"{props.major}.{props.minor}"})
    return {"cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "driver": _driver_version(), "gpus": gpus}


def _unavailable(backend: str, has_gpu: bool) -> str | None:
    """Why ``backend`` cannot run here, or None."""
    from pdserve.transfer.base import TRANSFER_BACKENDS

    agent = TRANSFER_BACKENDS.get(backend)  # its module imports no native library
    if agent.native_package is not None and importlib.util.find_spec(agent.native_package) is None:
        return f"the {agent.native_package} package is not installed"
    if agent.needs_gpu and not has_gpu:
        return "needs a CUDA GPU"
    return None


def transfer_self_test(cfg: CheckEnvConfig, backend: str, has_gpu: bool) -> dict[str, Any]:
    """``{"status": "ok", "gb_per_s", ...}``, or a status of unavailable/failed with its reason."""
    reason = _unavailable(backend, has_gpu)
    if reason is not None:
        return {"status": "not available", "reason": reason}
    from pdserve.benchmarks.transfer_bench import TransferBenchConfig, bench_backend
    from pdserve.common.kv_layout import KVLayout

    device = "cuda" if has_gpu else "cpu"
    tokens = cfg.transfer_test_tokens
    layout = KVLayout(num_pages=math.ceil(tokens / SELF_TEST_LAYOUT["page_size"]), **SELF_TEST_LAYOUT)
    bench = TransferBenchConfig(page_size=layout.page_size, device=device, backends=(backend,), min_tokens=tokens,
                                max_tokens=tokens, repeats=cfg.transfer_test_repeats, timeout_s=cfg.timeout_s,
                                verify=True)
    try:
        row = bench_backend(bench, layout, backend)[0]
    except Exception as exc:  # noqa: BLE001 - any failure is the self-test's answer
        return {"status": "failed", "reason": one_line(f"{type(exc).__name__}: {exc}")}
    if not row.verified:
        return {"status": "failed", "reason": "the decode side's pages differ from the prefill side's"}
    return {"status": "ok", "device": device, "num_bytes": row.num_bytes, "time_s": row.time_s,
            "gb_per_s": row.bytes_per_s / 1e9, "descriptors": row.descriptors_per_room}


def collect(cfg: CheckEnvConfig) -> dict[str, Any]:
    """The whole report as a JSON-ready dict."""
    from pdserve.common.version import __version__
    from pdserve.transfer.base import TRANSFER_BACKENDS

    report: dict[str, Any] = {"pdserve": __version__, "python": platform.python_version(),
                              "platform": platform.platform(), "packages": package_versions()}
    report.update(cuda_facts())
    has_gpu = bool(report["gpus"])
    if not cfg.skip_transfer_test:
        with _stdout_to_stderr():
            report["transfer"] = {b: transfer_self_test(cfg, b, has_gpu) for b in TRANSFER_BACKENDS.names()}
    return report


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """The transfer agents' processes (and NIXL/UCX in them) print to descriptor 1:
    while they run it is stderr, so stdout holds the report alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _transfer_line(result: dict[str, Any]) -> str:
    if result["status"] == "ok":
        return (f"ok: {result['gb_per_s']:.2f} GB/s ({result['num_bytes'] / 2**20:.1f} MiB {result['device']} "
                f"loopback in {result['time_s'] * 1e3:.2f} ms, pages verified)")
    return f"{result['status']}: {result['reason']}"


def format_text(report: dict[str, Any]) -> str:
    rows = [("pdserve", report["pdserve"]), ("Python", report["python"]), ("Platform", report["platform"])]
    rows += [(name, version or "not installed") for name, version in report["packages"].items()]
    rows += [("CUDA (torch build)", report["cuda"] or "none"), ("CUDA available", str(report["cuda_available"])),
             ("NVIDIA driver", report["driver"] or "none")]
    gpus = report["gpus"]
    rows += [("GPUs", "none")] if not gpus else [
        (f"GPU {g['index']}", f"{g['name']}, {g['memory_gib']} GiB, compute {g['compute_capability']}") for g in gpus]
    rows += [(f"transfer {name}", _transfer_line(result)) for name, result in report.get("transfer", {}).items()]
    width = max(len(key) for key, _ in rows) + 2
    return "\n".join(f"{key:<{width}}{value}" for key, value in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve check-env", description=__doc__.split("\n\n")[0].replace("``", ""))
    add_dataclass_args(parser, CheckEnvConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(CheckEnvConfig, build_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))
    report = collect(cfg)
    print(json.dumps(report, indent=2) if cfg.json_output else format_text(report), flush=True)
    failed = [b for b, r in report.get("transfer", {}).items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
