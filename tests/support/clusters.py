"""A whole ``pdserve up`` cluster (bootstrap, router, instances) as real processes."""

from __future__ import annotations

from pathlib import Path

from pdserve.launcher import ClusterConfig
from pdserve.tests.support.ports import free_port, free_port_block


def local_cluster_config(log_dir: Path | str, num_prefill: int = 1, num_decode: int = 1, **fields: object) -> ClusterConfig:
    """A cluster of ``num_prefill`` + ``num_decode`` instances on ports free now,
    routed round-robin (so a test knows which instance gets which request), each
    child's log under ``log_dir``; ``fields`` set the rest of the config."""
    ports = {"port": free_port(), "bootstrap_port": free_port(), "base_port": free_port_block(num_prefill + num_decode)}
    return ClusterConfig(num_prefill=num_prefill, num_decode=num_decode, log_dir=str(log_dir),
                         **{"policy": "round_robin", **ports, **fields})  # type: ignore[arg-type]
