"""A peer that dies mid-room: the survivor answers, frees its pages, and keeps serving.

Rooms are driven directly against one prefill and one decode instance (no
router), so the test decides which pair a room uses and whom to kill.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from pdserve.launcher import Cluster, ClusterConfig
from pdserve.tests.server_utils import free_port
from pdserve.tests.test_pd_cluster import _ports

SERVE_ARGS = (
    "--page-size", "4", "--chunked-prefill-size", "16", "--max-total-tokens", "8192",
    "--skip-server-warmup", "--disaggregation-timeout-s", "5",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    cfg = ClusterConfig(
        num_prefill=2, num_decode=2, port=free_port(), bootstrap_port=free_port(), base_port=_ports(4),
        policy="round_robin", startup_timeout_s=180, log_dir=str(tmp_path_factory.mktemp("pd-fail")),
        serve_args=SERVE_ARGS,
    )
    with Cluster(cfg) as c:
        yield c


def _info(url: str) -> dict:
    return httpx.get(f"{url}/get_server_info", timeout=10, trust_env=False).json()


def _kill(cluster: Cluster, name: str) -> None:
    child = next(c for c in cluster.children if c.name == name)
    os.killpg(child.process.pid, signal.SIGKILL)
    child.process.wait(timeout=10)


def _room_body(ids: list[int], room: int, prefill_id: str, max_new: int) -> dict:
    return {
        "input_ids": ids, "bootstrap_room": room, "prefill_instance_id": prefill_id,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True},
    }


def _wait_used_zero(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _info(url)["kv_pool"]["used_pages"] != 0:
        assert time.monotonic() < deadline, f"{url} still holds pages: {_info(url)['kv_pool']}"
        time.sleep(0.2)


def _wait_transfer_peers(url: str, count: int, timeout_s: float = 30.0) -> None:
    """Until ``url`` holds ``count`` transfer peers; after a peer died, 0 says
    nothing of it is held once its rooms drained. (Generous: on a loaded
    2-core machine four instances share the cores.)"""
    deadline = time.monotonic() + timeout_s
    while _info(url)["num_transfer_peers"] != count:
        assert time.monotonic() < deadline, f"{url} never held {count} transfer peers: {_info(url)}"
        time.sleep(0.1)


def _start_room(prefill: str, decode: str, ids: list[int], max_new: int) -> tuple[dict, threading.Thread]:
    room = random.getrandbits(63)
    body = _room_body(ids, room, _info(prefill)["instance_id"], max_new)
    result: dict = {}

    def post(url: str, key: str) -> None:
        try:
            result[key] = httpx.post(f"{url}/generate", json=body, timeout=60, trust_env=False).status_code
        except httpx.HTTPError as exc:
            result[key] = type(exc).__name__

    threads = [threading.Thread(target=post, args=(u, k)) for u, k in ((prefill, "p"), (decode, "d"))]
    for t in threads:
        t.start()
    joiner = threading.Thread(target=lambda: [t.join() for t in threads])
    joiner.start()
    return result, joiner


def test_decode_survives_a_dead_prefill(cluster: Cluster) -> None:
    prefill, decode = cluster.instance_urls("prefill")[0], cluster.instance_urls("decode")[0]
    ids = [random.Random(1).randrange(4, 1000) for _ in range(1500)]
    result, joiner = _start_room(prefill, decode, ids, max_new=4)
    _wait_transfer_peers(decode, 1)  # the room is open: D loaded P
    _kill(cluster, "prefill-0")
    joiner.join(timeout=60)
    assert not joiner.is_alive(), "a request hung after its prefill instance died"
    assert result["d"] in (200, 502, 504), result
    _wait_used_zero(decode)
    _wait_transfer_peers(decode, 0)
    # The decode instance still serves (a request without a room is prefilled locally).
    ok = httpx.post(f"{decode}/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}},
                    timeout=30, trust_env=False)
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 3
    assert httpx.get(f"{decode}/health", timeout=5, trust_env=False).status_code == 200


def test_prefill_survives_a_dead_decode(cluster: Cluster, oracle) -> None:
    prefill = cluster.instance_urls("prefill")[1]
    dead, alive = cluster.instance_urls("decode")
    ids = [random.Random(2).randrange(4, 1000) for _ in range(1500)]
    result, joiner = _start_room(prefill, dead, ids, max_new=200)
    _wait_transfer_peers(prefill, 1)  # the room is paired: P loaded D
    _kill(cluster, "decode-0")
    joiner.join(timeout=60)
    assert not joiner.is_alive(), "a request hung after its decode instance died"
    _wait_used_zero(prefill)
    _wait_transfer_peers(prefill, 0)
    assert httpx.get(f"{prefill}/health", timeout=5, trust_env=False).status_code == 200
    # The prefill instance pairs with the surviving decode instance and answers exactly.
    short = [9, 8, 7, 6, 5, 4, 10, 11, 12]
    result, joiner = _start_room(prefill, alive, short, max_new=6)
    joiner.join(timeout=60)
    assert result == {"p": 200, "d": 200}, result
    assert _info(prefill)["num_transfer_peers"] == 1
    body = _room_body(short, random.getrandbits(63), _info(prefill)["instance_id"], 6)
    with httpx.Client(timeout=60, trust_env=False) as http:
        p = threading.Thread(target=lambda: http.post(f"{prefill}/generate", json=body))
        p.start()
        out = http.post(f"{alive}/generate", json=body).json()
        p.join()
    assert out["output_ids"] == oracle.greedy(short, 6)
    _wait_used_zero(alive)
