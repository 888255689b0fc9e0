"""A prefill and a decode instance on ONE GPU, KV pages moving VRAM to VRAM
over NIXL and over the cuda_ipc backend's direct copies: greedy outputs through
the router equal a colocated instance's.

Each instance sizes its pool with ``--mem-fraction-static`` from the memory
that was free when it started, so three instances share the card.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SERVE_ARGS = ("--load-format", "dummy", "--dtype", "bfloat16", "--mem-fraction-static", "0.1", "--base-gpu-id", "0",
              "--page-size", "16", "--cuda-graph-max-bs", "8", "--decode-log-interval", "1")
MAX_NEW = 12


def _config(root: Path, name: str, transfer_backend: str = "nixl", **roles):
    from pdserve.launcher import ClusterConfig
    from pdserve.tests.support.ports import free_port, free_port_block
    from pdserve.tests.support.small_models import small_llama_dir

    return ClusterConfig(model_path=small_llama_dir(root), port=free_port(),
                         bootstrap_port=free_port(), base_port=free_port_block(sum(roles.values())),
                         transfer_backend=transfer_backend, policy="round_robin", startup_timeout_s=600,
                         log_dir=str(root / name), serve_args=SERVE_ARGS, **roles)


@pytest.fixture(scope="module")
def colocated(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from pdserve.launcher import Cluster

    root = tmp_path_factory.mktemp("gpu-colocated")
    with Cluster(_config(root, "colocated", num_prefill=0, num_decode=0, num_colocated=1)) as cluster:
        yield cluster


@pytest.fixture(scope="module", params=["nixl", "cuda_ipc"])
def clusters(request: pytest.FixtureRequest, colocated, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    from pdserve.launcher import Cluster

    root = tmp_path_factory.mktemp(f"gpu-pd-{request.param}")
    with Cluster(_config(root, "pd", request.param, num_prefill=1, num_decode=1)) as pd:
        yield pd, colocated, root, request.param


def _generate(base: str, ids: list[int]) -> list[int]:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}
    resp = httpx.post(f"{base}/generate", json=body, timeout=120, trust_env=False)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def test_pd_on_one_gpu_equals_colocated(clusters) -> None:
    pd, colocated, root, backend = clusters
    rng = random.Random(5)
    for n in (3, 16, 17, 100, 700):
        ids = [rng.randrange(4, 1000) for _ in range(n)]
        assert _generate(pd.router_url, ids) == _generate(colocated.router_url, ids), f"prompt of {n} tokens"
    for url in pd.instance_urls("prefill") + pd.instance_urls("decode"):
        info = httpx.get(f"{url}/get_server_info", timeout=10, trust_env=False).json()
        assert info["device"] == "cuda:0" and info["attention_backend"] == "flashinfer"
    decode_log = Path(root, "pd", "decode-0.log").read_text()
    assert "cuda graph: True" in decode_log
    assert "available_gpu_mem=" in decode_log
    prefill_log = Path(root, "pd", "prefill-0.log").read_text()
    assert ("go through CUDA IPC" in prefill_log) == (backend == "cuda_ipc")
    # ... and the chunk notices came through the notice ring, written by P's copy stream
    assert ("writes its chunk notices into a ring" in decode_log) == (backend == "cuda_ipc")
