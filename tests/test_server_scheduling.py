"""Scheduling under pressure: retraction in a tiny pool, and the lpm policy, stay exact."""

from __future__ import annotations

from pdserve.tests.support.hf_oracle import HFOracle
from pdserve.tests.support.openai_errors import assert_openai_error
from pdserve.tests.support.payloads import generate_body, prompt_ids
from pdserve.tests.support.server_process import ServerProcess, post_concurrently, server_fixture

RETRACT_LOG_LINE = "KV cache pool is full. Retract requests."


# 16 pages of 4 tokens: two 40-token sequences already do not fit together.
tiny_pool_server = server_fixture(("--max-total-tokens", "64", "--page-size", "4", "--skip-server-warmup"),
                                  "tiny_pool.log")
lpm_server = server_fixture(
    ("--schedule-policy", "lpm", "--page-size", "4", "--max-total-tokens", "2048", "--skip-server-warmup"), "lpm.log")


def test_retraction_keeps_outputs_exact(tiny_pool_server: ServerProcess, oracle: HFOracle) -> None:
    prompts = [prompt_ids(12, seed=100 + i) for i in range(4)]
    max_new = 28
    responses = post_concurrently(tiny_pool_server, "/generate", [generate_body(p, max_new) for p in prompts])
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert [r.json()["output_ids"] for r in responses] == [oracle.greedy(p, max_new) for p in prompts]
    assert RETRACT_LOG_LINE in tiny_pool_server.log_text()
    assert tiny_pool_server.server_info()["num_retracted_reqs"] > 0


def test_tiny_pool_rejects_what_can_never_fit(tiny_pool_server: ServerProcess) -> None:
    assert_openai_error(tiny_pool_server.post("/generate", generate_body(prompt_ids(100, seed=1), 4)), 400, param="prompt")


def test_lpm_policy_answers_correctly(lpm_server: ServerProcess, oracle: HFOracle) -> None:
    shared = prompt_ids(24, seed=200)
    # Prompts sharing prefixes of different lengths, sent together so lpm reorders them.
    prompts = [shared + prompt_ids(n, seed=300 + n) for n in (3, 9, 17)] + [prompt_ids(30, seed=400), shared[:10]]
    max_new = 10
    warm = lpm_server.post("/generate", generate_body(shared + [5, 6, 7, 8], 2))
    assert warm.status_code == 200
    responses = post_concurrently(lpm_server, "/generate", [generate_body(p, max_new) for p in prompts])
    assert [r.json()["output_ids"] for r in responses] == [oracle.greedy(p, max_new) for p in prompts]
    assert any(r.json()["meta_info"]["cached_tokens"] >= 24 for r in responses[:3])
