"""Tensor parallelism inside one instance: ranks under gloo decode what
transformers decodes, greedy, alone and batched.

``small`` (8 q / 4 KV heads) at --tp 2 splits every head group; ``tiny``
(4 q / 2 KV heads) at --tp 4 replicates each KV head on two ranks. Prompts
cross page and chunk borders (4-token pages, 16-token chunks).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pdserve.model.builtin import ensure_builtin_model
from pdserve.tests.support.hf_oracle import HFOracle
from pdserve.tests.support.payloads import generate_body, prompt_ids
from pdserve.tests.support.server_process import post_concurrently, served

FLAGS = ("--device", "cpu", "--page-size", "4", "--chunked-prefill-size", "16", "--max-total-tokens", "2048")
PROMPT_LENS = (1, 5, 16, 33, 70)
MAX_NEW = 10
CASES = {"small-tp2": ("small", 2, 2000), "tiny-tp4": ("tiny", 4, 1000)}


@pytest.fixture(scope="module", params=sorted(CASES))
def tp_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    model, tp, vocab = CASES[request.param]
    model_dir = ensure_builtin_model(model)
    log = tmp_path_factory.mktemp("tp") / f"{request.param}.log"
    with served((*FLAGS, "--model-path", model_dir, "--tp", str(tp)), log) as server:
        yield server, HFOracle(model_dir), tp, vocab


def test_ranks_are_processes(tp_case: tuple) -> None:
    server, _, tp, _ = tp_case
    info = server.server_info()
    assert len(set(info["rank_pids"])) == tp


def test_greedy_matches_transformers(tp_case: tuple) -> None:
    server, oracle, _, vocab = tp_case
    prompts = [prompt_ids(n, seed=n, vocab_size=vocab) for n in PROMPT_LENS]
    expected = [oracle.greedy(ids, MAX_NEW) for ids in prompts]
    first = server.post("/generate", generate_body(prompts[2], MAX_NEW))
    assert first.status_code == 200, first.text
    assert first.json()["output_ids"] == expected[2]
    responses = post_concurrently(server, "/generate", [generate_body(ids, MAX_NEW) for ids in prompts])
    assert [r.json()["output_ids"] for r in responses] == expected
    info = server.wait_idle(10.0)
    assert info["kv_pool"]["used_pages"] == 0


def test_cli_flags(tmp_path: Path) -> None:
    import argparse

    from pdserve.common.args import add_dataclass_args, config_from_args
    from pdserve.common.config import ServerConfig, rendezvous_address

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ServerConfig)
    cfg = config_from_args(ServerConfig, parser.parse_args(["--tp", "4", "--base-gpu-id", "2", "--gpu-id-step", "2"]))
    assert (cfg.tp_size, cfg.base_gpu_id, cfg.gpu_id_step) == (4, 2, 2)
    assert cfg.resolve().nccl_port and rendezvous_address(cfg.resolve()).startswith("127.0.0.1:")
    cfg = config_from_args(ServerConfig, parser.parse_args(["--tp-size", "2", "--dist-init-addr", "10.0.0.1:5000"]))
    assert rendezvous_address(cfg.resolve()) == "10.0.0.1:5000"
