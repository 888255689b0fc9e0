"""A whole local cluster (bootstrap, router, instances) as real processes:
the config of a :class:`~pdserve.launcher.Cluster`, or a ``pdserve up`` command."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pdserve.launcher import ClusterConfig
from pdserve.tests.support.ports import free_port, free_port_block
from pdserve.tests.support.processes import stop_process
from pdserve.tests.support.waiting import wait_until

UP_LINE = "pdserve is up"  # what `pdserve up` prints once every child is healthy


def local_cluster_config(log_dir: Path | str, num_prefill: int = 1, num_decode: int = 1, **fields: object) -> ClusterConfig:
    """A cluster of ``num_prefill`` + ``num_decode`` instances on ports free now,
    routed round-robin (so a test knows which instance gets which request), each
    child's log under ``log_dir``; ``fields`` set the rest of the config."""
    ports = {"port": free_port(), "bootstrap_port": free_port(), "base_port": free_port_block(num_prefill + num_decode)}
    return ClusterConfig(num_prefill=num_prefill, num_decode=num_decode, log_dir=str(log_dir),
                         **{"policy": "round_robin", **ports, **fields})  # type: ignore[arg-type]


def up_command(first_port: int, log_dir: Path, startup_timeout_s: float, serve_args: Sequence[str],
               *flags: str) -> list[str]:
    """``pdserve up FLAGS -- SERVE_ARGS``: one prefill and one decode instance, the
    router on ``first_port``, the bootstrap service on the next, the instances on
    the two after; round-robin, the router checking health every 0.5 s."""
    return [sys.executable, "-m", "pdserve.cli", "up", "--port", str(first_port),
            "--bootstrap-port", str(first_port + 1), "--base-port", str(first_port + 2), "--policy", "round_robin",
            "--startup-timeout-s", str(startup_timeout_s), "--log-dir", str(log_dir),
            "--router-args", "--health-check-interval-s 0.5", *flags, "--", *serve_args]


def start_up(argv: list[str], out_path: Path, timeout_s: float, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run ``argv`` (a ``pdserve up`` command), its output to ``out_path``, and
    return it once it says it is up; stopped again if it never does."""
    with open(out_path, "wb") as out:
        launcher = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def up() -> bool:
        if launcher.poll() is not None:
            raise AssertionError(f"pdserve up exited with {launcher.returncode}: {out_path.read_text()}")
        return UP_LINE in out_path.read_text()

    try:
        wait_until(up, timeout_s, 0.2, lambda: f"pdserve up never came up: {out_path.read_text()}")
    except BaseException:
        stop_process(launcher, timeout_s=60.0)
        raise
    return launcher
