"""``pdserve check-env`` as a real process: versions, GPUs, and a loopback transfer per backend."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import torch
from pdserve.check_env import format_text
from pdserve.transfer.base import TRANSFER_BACKENDS

RUN_TIMEOUT_S = 300.0


def _check_env(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", "check-env", *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


def test_json_report_with_a_loopback_transfer_per_backend() -> None:
    done = _check_env("--json", "--transfer-test-tokens", "256", "--transfer-test-repeats", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["packages"]["torch"] == torch.__version__
    assert set(report["packages"]) == {"torch", "triton", "flashinfer", "nixl", "ucxx", "transformers"}
    assert report["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["cuda"] == torch.version.cuda
    has_gpu = torch.cuda.is_available()
    assert (len(report["gpus"]) > 0) == has_gpu
    assert set(report["transfer"]) == set(TRANSFER_BACKENDS.names())
    for backend, result in report["transfer"].items():
        agent = TRANSFER_BACKENDS.get(backend)
        runnable = importlib.util.find_spec(agent.native_package) is not None and (not agent.needs_gpu or has_gpu)
        if runnable:
            assert result["status"] == "ok", result
            assert result["gb_per_s"] > 0 and result["num_bytes"] == 16 * 2**20 // 4
        else:
            assert result["status"] == "not available" and result["reason"], result
    if not has_gpu:
        assert report["transfer"]["cuda_ipc"] == {"status": "not available", "reason": "needs a CUDA GPU"}
        assert "GPUs" in format_text(report) and "transfer cuda_ipc" in format_text(report)


def test_text_report() -> None:
    done = _check_env("--skip-transfer-test")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"^torch +{re.escape(torch.__version__)}$", done.stdout, re.M), done.stdout
    assert re.search(r"^Python +\d+\.\d+\.\d+$", done.stdout, re.M), done.stdout
    assert "transfer" not in done.stdout
    if not torch.cuda.is_available():
        assert re.search(r"^GPUs +none$", done.stdout, re.M), done.stdout
