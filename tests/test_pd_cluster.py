"""The whole PD stack as real processes: bootstrap + router + prefill + decode.

KV pages move over real NIXL (and UCX) transfers on DRAM. Greedy outputs through
the router must equal transformers' greedy outputs on the same weights, and
every instance's pool must be back to zero used pages after each test.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pdserve.launcher import Cluster
from pdserve.tests.support.clusters import local_cluster_config
from pdserve.tests.support.health import is_healthy
from pdserve.tests.support.payloads import generate_body
from pdserve.tests.support.ports import free_port
from pdserve.tests.support.router_process import router_served
from pdserve.tests.support.waiting import wait_until

SERVE_ARGS = ("--page-size", "4", "--chunked-prefill-size", "16", "--max-total-tokens", "4096", "--skip-server-warmup")
# Shorter and longer than a page (4) and than a chunk (16).
PROMPT_LENGTHS = (3, 9, 17, 40)
MAX_NEW = 8


def _cluster(tmp: Path, backend: str, num_prefill: int = 1, num_decode: int = 1) -> Cluster:
    return Cluster(local_cluster_config(tmp, num_prefill, num_decode, transfer_backend=backend,
                                        startup_timeout_s=180, serve_args=SERVE_ARGS))


def _used_pages(url: str) -> int:
    info = httpx.get(f"{url}/get_server_info", timeout=10, trust_env=False).json()
    return info["kv_pool"]["used_pages"]


def assert_no_leaks(cluster: Cluster, timeout_s: float = 10.0) -> None:
    urls = cluster.instance_urls("prefill") + cluster.instance_urls("decode")
    used: dict[str, int] = {}

    def no_pages_used() -> bool:
        used.update({u: _used_pages(u) for u in urls})
        return all(v == 0 for v in used.values())

    wait_until(no_pages_used, timeout_s, 0.1, lambda: f"pages still in use after the run: {used}")


@pytest.fixture(scope="module", params=["nixl", "ucx"])
def cluster(request, tmp_path_factory) -> Iterator[Cluster]:
    with _cluster(tmp_path_factory.mktemp(f"pd-{request.param}"), request.param) as c:
        yield c
        assert_no_leaks(c)


def _prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 1000) for _ in range(n)] for n in lengths]


def _generate(base: str, ids: list[int], max_new: int = MAX_NEW) -> dict:
    resp = httpx.post(f"{base}/generate", json=generate_body(ids, max_new), timeout=60, trust_env=False)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_greedy_equals_transformers_one_by_one(cluster: Cluster, oracle) -> None:
    for ids in _prompts():
        out = _generate(cluster.router_url, ids)
        assert out["output_ids"] == oracle.greedy(ids, MAX_NEW), f"prompt of {len(ids)} tokens"
        assert out["meta_info"]["prompt_tokens"] == len(ids)
    assert_no_leaks(cluster)


def test_logit_bias_holds_on_both_sides(cluster: Cluster, oracle) -> None:
    """P samples the first token and D the rest: both apply the request's bias."""
    ids = _prompts(lengths=[11], seed=5)[0]
    greedy = oracle.greedy(ids, 3)
    banned = {str(t): -100 for t in greedy}
    body = generate_body(ids, 3, logit_bias={**banned, "7": 100})
    resp = httpx.post(f"{cluster.router_url}/generate", json=body, timeout=60, trust_env=False)
    assert resp.status_code == 200 and resp.json()["output_ids"] == [7, 7, 7], resp.text
    assert_no_leaks(cluster)


def test_min_new_tokens_holds_on_both_sides(cluster: Cluster, oracle) -> None:
    """EOS forced by +100 is held back by P (the first token) and D (the second)."""
    ids = _prompts(lengths=[13], seed=6)[0]
    eos = oracle.model.config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    greedy = oracle.greedy(ids, 2)
    assert not set(greedy) & set(eos)
    body = generate_body(ids, 6, ignore_eos=False, logit_bias={str(eos[0]): 100}, min_new_tokens=2)
    resp = httpx.post(f"{cluster.router_url}/generate", json=body, timeout=60, trust_env=False)
    assert resp.status_code == 200 and resp.json()["output_ids"] == greedy + [eos[0]], resp.text
    assert_no_leaks(cluster)


def test_sixteen_concurrent_requests(cluster: Cluster, oracle) -> None:
    prompts = _prompts(lengths=[3 + 3 * i for i in range(16)], seed=1)

    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as http:
            bodies = [generate_body(ids, MAX_NEW) for ids in prompts]
            resps = await asyncio.gather(*(http.post(f"{cluster.router_url}/generate", json=b) for b in bodies))
        return [r.json() for r in resps]

    outs = asyncio.run(run())
    for ids, out in zip(prompts, outs):
        assert out["output_ids"] == oracle.greedy(ids, MAX_NEW)
    assert_no_leaks(cluster)


def test_prefix_cache_hit_on_prefill_still_sends_whole_prompt(cluster: Cluster, oracle) -> None:
    ids = _prompts(lengths=[37], seed=7)[0]
    first = _generate(cluster.router_url, ids)
    second = _generate(cluster.router_url, ids)
    # The second run reuses P's cached pages; D must still get every page.
    assert second["meta_info"]["cached_tokens"] > 0
    assert first["output_ids"] == second["output_ids"] == oracle.greedy(ids, MAX_NEW)


def test_openai_client_streamed_and_not(cluster: Cluster, oracle) -> None:
    client = openai.OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)
    prompt = "The quick brown fox jumps over the lazy dog, and then"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_NEW, temperature=0)
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    ids = oracle.tokenizer.encode(prompt)
    assert whole.choices[0].text == oracle.tokenizer.decode(oracle.greedy(ids, MAX_NEW), skip_special_tokens=True)
    messages = [{"role": "user", "content": "Say something about pages."}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_NEW, temperature=0)
    chat_stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_NEW, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices)
    assert text == chat.choices[0].message.content
    assert chat.usage.completion_tokens == MAX_NEW or chat.choices[0].finish_reason == "stop"
    # The client's model calls go through the router to an instance.
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-served")
    assert_no_leaks(cluster)


def test_client_abort_mid_stream_frees_pages(cluster: Cluster) -> None:
    body = {"prompt": "a b c d e f g", "max_tokens": 1500, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{cluster.router_url}/v1/completions", json=body, timeout=60, trust_env=False) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 6:
                break
    assert_no_leaks(cluster)


def test_server_info_reports_roles(cluster: Cluster) -> None:
    workers = httpx.get(f"{cluster.router_url}/workers", timeout=10, trust_env=False).json()
    assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
    assert all(w["healthy"] for w in workers)


def _get_json(url: str) -> dict:
    response = httpx.get(url, timeout=60, trust_env=False)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return response.json()


def test_health_is_json_on_every_role(cluster: Cluster) -> None:
    for role in ("prefill", "decode"):
        (url,) = cluster.instance_urls(role)
        assert _get_json(f"{url}/health")["status"] == "ok"
        health = _get_json(f"{url}/health_generate")
        assert (health["status"], health["role"]) == ("ok", role)
    assert _get_json(f"{cluster.router_url}/health") == {"status": "ok"}
    assert _get_json(f"{cluster.bootstrap_url}/health") == {"status": "ok", "num_instances": 2}


def test_router_health_generate_runs_one_token_through_a_pair(cluster: Cluster) -> None:
    (decode_url,) = cluster.instance_urls("decode")
    assert _get_json(f"{cluster.router_url}/health_generate") == {"status": "ok", "mode": "pd"}
    assert_no_leaks(cluster)
    assert _get_json(f"{decode_url}/get_server_info")["num_running_reqs"] == 0


def test_server_info_has_the_effective_config_and_live_stats(cluster: Cluster) -> None:
    _generate(cluster.router_url, _prompts(lengths=(9,))[0])
    router = _get_json(f"{cluster.router_url}/get_server_info")
    assert router["role"] == "router" and router["mode"] == "pd" and router["version"]
    assert router["config"]["policy"] == "round_robin" and router["config"]["port"] == cluster.config.port
    assert router["config"]["prefill_urls"] == cluster.instance_urls("prefill")
    assert router["num_workers"] == {"prefill": {"total": 1, "healthy": 1}, "decode": {"total": 1, "healthy": 1}}
    assert {"num_running_reqs", "num_queued_reqs", "num_in_flight_reqs", "policy", "instances"} <= set(router)
    assert sorted(i["server_info"]["role"] for i in router["instances"]) == ["decode", "prefill"]
    for role in ("prefill", "decode"):
        (url,) = cluster.instance_urls(role)
        info = _get_json(f"{url}/get_server_info")
        assert (info["role"], info["disaggregation_mode"], info["ready"]) == (role, role, True)
        assert info["page_size"] == 4 and info["chunked_prefill_size"] == 16  # the flags it runs with
        assert info["disaggregation_transfer_backend"] == cluster.config.transfer_backend
        assert info["api_key"] is None
        assert {"num_running_reqs", "num_queued_reqs", "kv_pool", "context_len"} <= set(info)
        assert info["kv_pool"]["total_pages"] > 0
    bootstrap = _get_json(f"{cluster.bootstrap_url}/get_server_info")
    assert bootstrap["role"] == "bootstrap" and bootstrap["config"]["port"] == cluster.config.bootstrap_port
    assert bootstrap["num_instances"] == 2
    assert bootstrap["num_instances_by_role"] == {"null": 0, "prefill": 1, "decode": 1}
    assert bootstrap["uptime_s"] > 0


@pytest.fixture(scope="module")
def big_cluster(tmp_path_factory) -> Iterator[Cluster]:
    with _cluster(tmp_path_factory.mktemp("pd-2x2"), "nixl", num_prefill=2, num_decode=2) as c:
        yield c
        assert_no_leaks(c)


def test_up_means_every_instance_is_up(big_cluster: Cluster) -> None:
    """Not only one worker per role: each instance answers at once when sent to directly."""
    urls = big_cluster.instance_urls("prefill") + big_cluster.instance_urls("decode")
    assert len(urls) == 4
    assert all(is_healthy(u, timeout_s=10) for u in urls)


@pytest.mark.parametrize("policy", ["round_robin", "random", "power_of_two", "cache_aware"])
def test_two_by_two_with_each_policy(big_cluster: Cluster, oracle, policy: str, tmp_path: Path) -> None:
    flags = ["--policy", policy, "--prefill", *big_cluster.instance_urls("prefill"),
             "--decode", *big_cluster.instance_urls("decode")]
    with router_served(flags, tmp_path / "router.log") as router:
        url = router.url
        prompts = _prompts(lengths=[5, 11, 19, 26, 33, 41], seed=3)
        for ids in prompts:
            assert _generate(url, ids)["output_ids"] == oracle.greedy(ids, MAX_NEW)
        infos = [httpx.get(f"{u}/get_server_info", timeout=10, trust_env=False).json() for u in big_cluster.instance_urls("decode")]
        assert all(i["num_running_reqs"] == 0 for i in infos)
        assert_no_leaks(big_cluster)


def test_layout_mismatch_is_refused_at_startup(big_cluster: Cluster, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(free_port()), "--skip-server-warmup",
            "--disaggregation-mode", "decode", "--disaggregation-bootstrap-url", big_cluster.bootstrap_url,
            "--page-size", "8", "--max-total-tokens", "1024"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "page_size" in out and "8" in out and "4" in out, out[-2000:]


def test_abort_during_prefill_transfer_frees_pages_on_both_sides(cluster: Cluster, oracle) -> None:
    # A long prompt prefilled in 16-token chunks: the client leaves while P is
    # still writing pages, so D must quarantine and then free them.
    ids = _prompts(lengths=[900], seed=11)[0]
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "stream": True}
    # The client gives up after 0.1 s; on a fast machine the room may already be
    # done, which must be just as clean.
    try:
        with httpx.stream("POST", f"{cluster.router_url}/generate", json=body, timeout=0.1, trust_env=False) as resp:
            for _ in resp.iter_lines():
                pass
    except httpx.TimeoutException:
        pass
    assert_no_leaks(cluster, timeout_s=20)
    # The pair still serves correctly afterwards.
    short = _prompts(lengths=[6], seed=12)[0]
    assert _generate(cluster.router_url, short)["output_ids"] == oracle.greedy(short, MAX_NEW)
