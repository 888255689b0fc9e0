"""A peer that dies mid-room: the survivor answers, frees its pages, and keeps serving.

Rooms are driven directly against one prefill and one decode instance (no
router), so the test decides which pair a room uses and whom to kill.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator

import httpx
import pytest
from pdserve.launcher import Cluster
from pdserve.tests.support.clusters import local_cluster_config
from pdserve.tests.support.health import is_healthy
from pdserve.tests.support.payloads import generate_body
from pdserve.tests.support.waiting import wait_until

SERVE_ARGS = (
    "--page-size", "4", "--chunked-prefill-size", "16", "--max-total-tokens", "8192",
    "--skip-server-warmup", "--disaggregation-timeout-s", "5",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    cfg = local_cluster_config(tmp_path_factory.mktemp("pd-fail"), num_prefill=2, num_decode=2, startup_timeout_s=180,
                               serve_args=SERVE_ARGS)
    with Cluster(cfg) as c:  # up: every instance is healthy
        yield c


def _info(url: str) -> dict:
    return httpx.get(f"{url}/get_server_info", timeout=10, trust_env=False).json()


def _kill(cluster: Cluster, name: str) -> None:
    child = next(c for c in cluster.children if c.name == name)
    os.killpg(child.process.pid, signal.SIGKILL)
    child.process.wait(timeout=10)


def _log_tails(cluster: Cluster) -> str:
    return "\n".join(f"--- {c.name} ---\n{c.log_tail(3000)}" for c in cluster.children if c.name != "bootstrap")


def _room_body(ids: list[int], room: int, prefill_id: str, max_new: int) -> dict:
    return {**generate_body(ids, max_new), "bootstrap_room": room, "prefill_instance_id": prefill_id}


def _wait_used_zero(url: str, timeout_s: float = 20.0) -> None:
    wait_until(lambda: _info(url)["kv_pool"]["used_pages"] == 0, timeout_s, 0.2,
               lambda: f"{url} still holds pages: {_info(url)['kv_pool']}")


def _wait_transfer_peers(url: str, count: int, timeout_s: float = 30.0) -> None:
    """Until ``url`` holds ``count`` transfer peers; after a peer died, 0 says
    nothing of it is held once its rooms drained. (Generous: on a loaded
    2-core machine four instances share the cores.)"""
    wait_until(lambda: _info(url)["num_transfer_peers"] == count, timeout_s, 0.1,
               lambda: f"{url} never held {count} transfer peers: {_info(url)}")


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


def _kill_mid_room(cluster: Cluster, survivor: str, victim: str, joiner: threading.Thread, result: dict) -> None:
    """Kill ``victim`` once ``survivor`` loaded it for the open room; both of
    the room's requests must end, and ``survivor`` must let go of its pages and
    of the dead peer."""
    # The room is paired; a room that ended before pairing says why in ``result``.
    wait_until(lambda: _info(survivor)["num_transfer_peers"] == 1 or not joiner.is_alive(), 30.0, 0.1,
               lambda: f"{survivor} never paired the room: {_info(survivor)}")
    assert joiner.is_alive(), f"the room ended before {victim} was killed: {result}\n{_log_tails(cluster)}"
    _kill(cluster, victim)
    joiner.join(timeout=60)
    assert not joiner.is_alive(), f"a request hung after {victim} died"
    _wait_used_zero(survivor)
    _wait_transfer_peers(survivor, 0)


def test_decode_survives_a_dead_prefill(cluster: Cluster) -> None:
    prefill, decode = cluster.instance_urls("prefill")[0], cluster.instance_urls("decode")[0]
    ids = [random.Random(1).randrange(4, 1000) for _ in range(1500)]
    result, joiner = _start_room(prefill, decode, ids, max_new=4)
    _kill_mid_room(cluster, decode, "prefill-0", joiner, result)
    assert result["d"] in (200, 502, 504), result
    # The decode instance still serves (a request without a room is prefilled locally).
    ok = httpx.post(f"{decode}/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}},
                    timeout=30, trust_env=False)
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 3
    assert is_healthy(decode)


def test_prefill_survives_a_dead_decode(cluster: Cluster, oracle) -> None:
    prefill = cluster.instance_urls("prefill")[1]
    dead, alive = cluster.instance_urls("decode")
    ids = [random.Random(2).randrange(4, 1000) for _ in range(1500)]
    result, joiner = _start_room(prefill, dead, ids, max_new=200)
    _kill_mid_room(cluster, prefill, "decode-0", joiner, result)
    assert is_healthy(prefill)
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
