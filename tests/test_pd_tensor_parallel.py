"""PD with different tensor-parallel sizes on the two sides, through the router.

Built-in ``small`` model (4 KV heads), NIXL and UCX on DRAM, ranks under
gloo. Two cluster shapes cover the four pairs on each backend: prefill TP
(1, 4) -> decode TP 2 gives 1->2 and 4->2, prefill TP 2 -> decode TP (1, 4)
gives 2->1 and 2->4 (round robin sends requests to each instance in turn).
Outputs must equal the colocated TP-1 answer (transformers' greedy
continuation, which colocated TP 1 reproduces in test_server_generation), one
at a time and all at once, and no instance may hold a page afterwards.

A decode instance whose rank 1 is killed mid-stream goes down cleanly: every
stream ends with an error within the timeout, ``/health`` says 503, and the
prefill instance releases its pages and the dead peer.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from pdserve.launcher import Cluster
from pdserve.model.builtin import ensure_builtin_model
from pdserve.tests.support.clusters import local_cluster_config
from pdserve.tests.support.health import is_healthy
from pdserve.tests.support.hf_oracle import HFOracle
from pdserve.tests.support.payloads import generate_body
from pdserve.tests.support.waiting import wait_until

SERVE_ARGS = ("--device", "cpu", "--page-size", "4", "--chunked-prefill-size", "16", "--max-total-tokens", "2048",
              "--skip-server-warmup", "--disaggregation-timeout-s", "20")
PROMPT_LENGTHS = (3, 9, 17, 40)
MAX_NEW = 6
SHAPES = {"p1,4-d2": ((1, 4), (2,)), "p2-d1,4": ((2,), (1, 4))}
CLUSTERS = [(b, s) for b in ("nixl", "ucx") for s in sorted(SHAPES)]  # (backend, shape)


def _info(url: str) -> dict:
    return httpx.get(f"{url}/get_server_info", timeout=10, trust_env=False).json()


def _start(tmp, prefill_tp: tuple[int, ...], decode_tp: tuple[int, ...], backend: str = "nixl") -> Cluster:
    cfg = local_cluster_config(tmp, len(prefill_tp), len(decode_tp), model_path="small", transfer_backend=backend,
                               startup_timeout_s=300, serve_args=SERVE_ARGS, prefill_tp_size=prefill_tp,
                               decode_tp_size=decode_tp)
    cluster = Cluster(cfg)
    cluster.start()
    # The router is healthy once one instance of each role is; the test needs every one.
    urls = cluster.instance_urls("prefill") + cluster.instance_urls("decode")
    wait_until(lambda: all(is_healthy(u) for u in urls), 300, 0.5, lambda: "not every instance became healthy")
    wait_until(lambda: _router_sees_all(cluster, len(urls)), 60, 0.2, lambda: "the router never saw every worker healthy")
    return cluster


def _router_sees_all(cluster: Cluster, count: int) -> bool:
    workers = httpx.get(f"{cluster.router_url}/workers", timeout=10, trust_env=False).json()
    return sum(w["healthy"] for w in workers) == count


@pytest.fixture(scope="module")
def oracle() -> HFOracle:
    return HFOracle(ensure_builtin_model("small"))


@pytest.fixture(scope="module", params=CLUSTERS, ids=[f"{b}-{s}" for b, s in CLUSTERS])
def cluster(request, tmp_path_factory) -> Iterator[Cluster]:
    backend, shape = request.param
    prefill_tp, decode_tp = SHAPES[shape]
    cluster = _start(tmp_path_factory.mktemp(f"pd-tp-{backend}-{shape}"), prefill_tp, decode_tp, backend)
    try:
        yield cluster
    finally:
        cluster.stop()


def _no_pages_used(cluster: Cluster) -> None:
    urls = cluster.instance_urls("prefill") + cluster.instance_urls("decode")
    used: dict[str, tuple] = {}

    def idle() -> bool:
        for u in urls:
            info = _info(u)
            used[u] = (info["kv_pool"]["used_pages"], info.get("num_transferring_rooms"))
        return all(v == (0, 0) for v in used.values())

    wait_until(idle, 20, 0.2, lambda: f"pages or rooms still in use: {used}")


def test_mixed_tp_outputs_equal_tp1(cluster: Cluster, oracle: HFOracle) -> None:
    rng = random.Random(7)
    prompts = [[rng.randrange(4, 2000) for _ in range(n)] for n in PROMPT_LENGTHS for _ in range(2)]
    for ids in prompts:  # one at a time: round robin then alternates the pairs
        resp = httpx.post(f"{cluster.router_url}/generate", json=generate_body(ids, MAX_NEW), timeout=120,
                          trust_env=False)
        assert resp.status_code == 200, resp.text
        assert resp.json()["output_ids"] == oracle.greedy(ids, MAX_NEW), len(ids)
    # At once too: the parts of concurrent rooms land in any order.
    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(lambda ids: httpx.post(
            f"{cluster.router_url}/generate", json=generate_body(ids, MAX_NEW), timeout=120, trust_env=False), prompts))
    assert [r.json().get("output_ids") for r in responses] == [oracle.greedy(ids, MAX_NEW) for ids in prompts]
    urls = cluster.instance_urls("prefill") + cluster.instance_urls("decode")
    idle = [u for u in urls if _info(u)["num_generated_tokens"] == 0]
    assert not idle, f"{idle} served nothing: every pair must be exercised"
    _no_pages_used(cluster)


def _stream(router: str, ids: list[int], outcome: dict, key: int) -> None:
    body = {**generate_body(ids, 400), "stream": True}
    try:
        with httpx.stream("POST", f"{router}/generate", json=body, timeout=60, trust_env=False) as resp:
            text = ""
            for chunk in resp.iter_text():
                text += chunk
                outcome.setdefault(f"started-{key}", True)
            outcome[key] = (resp.status_code, text[-400:])
    except httpx.HTTPError as exc:
        outcome[key] = (None, type(exc).__name__)


def test_dead_decode_rank_takes_the_instance_down(tmp_path) -> None:
    cluster = _start(tmp_path, (1,), (2,))
    try:
        prefill, decode = cluster.instance_urls("prefill")[0], cluster.instance_urls("decode")[0]
        rank_pids = _info(decode)["rank_pids"]
        assert len(rank_pids) == 2
        rng = random.Random(3)
        outcome: dict = {}
        threads = [threading.Thread(target=_stream, args=(cluster.router_url, [rng.randrange(4, 2000) for _ in range(30)],
                                                          outcome, i)) for i in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: all(f"started-{i}" in outcome for i in range(3)), 60, 0.05,
                   lambda: f"streams never started: {outcome}")
        os.kill(rank_pids[1], signal.SIGKILL)
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a stream hung after a decode rank died"
        for i in range(3):
            status, tail = outcome[i]
            assert status != 200 or "error" in tail, f"stream {i} ended as if nothing happened: {outcome[i]}"
        wait_until(lambda: not is_healthy(decode), 30, 0.2, lambda: "decode still reports healthy")
        assert httpx.get(f"{decode}/health", timeout=5, trust_env=False).status_code == 503
        # Rank 0 and the other ranks are gone too: no process left behind.
        wait_until(lambda: not any(_pid_alive(p) for p in rank_pids), 30, 0.2, lambda: "a rank outlived its instance")
        # The prefill instance lets go of the room's pages and of the dead peer.
        wait_until(lambda: _info(prefill)["kv_pool"]["used_pages"] == 0 and _info(prefill)["num_transfer_peers"] == 0,
                   30, 0.2, lambda: f"prefill still holds: {_info(prefill)}")
        assert is_healthy(prefill)
    finally:
        cluster.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped yet) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
