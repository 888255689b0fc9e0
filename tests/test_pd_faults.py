"""Faults of real PD instances behind a real router: a frozen prefill, a dead
prefill's lease, a restarted prefill (same id and address, new epoch), a decode
that dies mid-stream, half-open client connections.

The transfer timeout is long (60 s) on purpose: every bound asserted here is
far below it, so nothing passes by waiting for a room's deadline.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from pdserve.bootstrap.client import BootstrapClient
from pdserve.common.errors import PREFILL_FAILED_CODE
from pdserve.common.roles import Role
from pdserve.launcher import Cluster
from pdserve.tests.support.clusters import local_cluster_config
from pdserve.tests.support.health import is_healthy
from pdserve.tests.support.payloads import generate_body, prompt_ids
from pdserve.tests.support.ports import closed_within
from pdserve.tests.support.waiting import wait_until
from pdserve.transfer.control import ControlClient
from pdserve.transfer.pd_messages import KVPagesRequest, PeerHello, RoomAbort

TRANSFER_TIMEOUT_S = 60.0
FIRST_BYTE_TIMEOUT_S = 2.0
SERVE_ARGS = ("--page-size", "4", "--chunked-prefill-size", "32", "--max-total-tokens", "8192",
              "--skip-server-warmup", "--disaggregation-timeout-s", str(TRANSFER_TIMEOUT_S),
              "--http-read-timeout-s", "2")
ROUTER_ARGS = (f"--first-byte-timeout-s {FIRST_BYTE_TIMEOUT_S} --health-check-interval-s 1 "
               "--health-check-timeout-s 2 --max-retries 3")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    cfg = local_cluster_config(tmp_path_factory.mktemp("pd-faults"), num_prefill=2, num_decode=2, startup_timeout_s=240,
                               serve_args=SERVE_ARGS, router_args=tuple(ROUTER_ARGS.split()))
    with Cluster(cfg) as c:  # up: every instance is healthy
        yield c


def _info(url: str) -> dict:
    return httpx.get(f"{url}/get_server_info", timeout=10, trust_env=False).json()


def _child(cluster: Cluster, name: str):
    return next(c for c in cluster.children if c.name == name)


def _signal(cluster: Cluster, name: str, sig: signal.Signals) -> None:
    os.killpg(_child(cluster, name).process.pid, sig)


def _used_pages(url: str) -> int:
    return _info(url)["kv_pool"]["used_pages"]


def _wait_router_healthy(cluster: Cluster) -> None:
    wait_until(lambda: all(w["healthy"] for w in httpx.get(cluster.router_url + "/workers", timeout=10).json()),
               60.0, 0.2, "not every worker came back")


def _log_tails(cluster: Cluster) -> str:
    return "\n".join(f"--- {c.name} ---\n{c.log_tail(2000)}" for c in cluster.children if c.name != "bootstrap")


@pytest.mark.parametrize("role", [Role.PREFILL, Role.DECODE])
def test_instances_close_half_open_client_connections(cluster: Cluster, role: Role) -> None:
    port = int(cluster.instance_urls(role)[0].rsplit(":", 1)[1])
    for sent in (b"", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"in"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(sent)
            started = time.monotonic()
            assert closed_within(sock, 20.0), f"{role} kept a half-open connection after {sent!r}"
            assert time.monotonic() - started < 15.0


def test_prefill_greets_with_its_epoch_and_refuses_rooms_of_another(cluster: Cluster) -> None:
    prefill_id = _info(cluster.instance_urls(Role.PREFILL)[0])["instance_id"]
    with BootstrapClient(cluster.bootstrap_url) as bootstrap:
        info = bootstrap.lookup(prefill_id)
    assert info is not None and len(info.epoch) == 16
    client = ControlClient(info.control_address)
    try:
        hello = wait_until(client.recv_nowait, 10.0, 0.05, "no greeting")
        assert hello == [PeerHello(instance_id=prefill_id, epoch=info.epoch)]
        room = random.getrandbits(63)
        client.send(KVPagesRequest(room=room, prefill_epoch="0" * 16, decode_instance_id="test", peer_info=b"",
                                   dst_pages=[1], num_prompt_tokens=3))
        answer = wait_until(client.recv_nowait, 10.0, 0.05, "no answer to a stale room")
        assert answer == [RoomAbort(room=room, reason="the prefill instance restarted")]
    finally:
        client.close()


def test_frozen_prefill_fails_over_and_the_decode_lets_its_rooms_go(cluster: Cluster) -> None:
    _wait_router_healthy(cluster)
    decode_urls = cluster.instance_urls(Role.DECODE)
    _signal(cluster, "prefill-0", signal.SIGSTOP)
    try:
        with httpx.Client(timeout=TRANSFER_TIMEOUT_S, trust_env=False) as http:
            for i in range(4):  # round robin: two of these start on the frozen prefill
                started = time.monotonic()
                body = {"prompt": f"frozen prefill {i} " * 8, "max_tokens": 4, "stream": i % 2 == 0}
                response = http.post(cluster.base_url + "/completions", json=body)
                elapsed = time.monotonic() - started
                assert response.status_code == 200, response.text
                assert "[DONE]" in response.text if body["stream"] else response.json()["choices"]
                # The first byte timeout, a probe and the work: far below the transfer timeout.
                assert elapsed < FIRST_BYTE_TIMEOUT_S + 12, elapsed
        frozen_s = time.monotonic()
    finally:
        _signal(cluster, "prefill-0", signal.SIGCONT)
    # The rooms given up on the decode side are freed once the prefill acknowledges
    # them (it wrote nothing): long before their deadline.
    wait_until(lambda: sum(_used_pages(u) for u in decode_urls) == 0, 20.0, 0.2,
               lambda: f"decode pages still held: {[_info(u) for u in decode_urls]}")
    assert time.monotonic() - frozen_s < TRANSFER_TIMEOUT_S / 2
    wait_until(lambda: _used_pages(cluster.instance_urls(Role.PREFILL)[0]) == 0, 20.0, 0.2)
    _wait_router_healthy(cluster)


def _room_on_decode_only(decode: str, prefill_id: str, result: dict) -> threading.Thread:
    """A room whose prefill never gets the request: D holds its pages, waiting."""
    body = {**generate_body(prompt_ids(40, seed=3), 4), "bootstrap_room": random.getrandbits(63),
            "prefill_instance_id": prefill_id}

    def post() -> None:
        started = time.monotonic()
        response = httpx.post(f"{decode}/generate", json=body, timeout=TRANSFER_TIMEOUT_S + 30, trust_env=False)
        result.update(status=response.status_code, body=response.json(), seconds=time.monotonic() - started)

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def _restart_with_same_identity(cluster: Cluster, name: str, instance_id: str, control_address: str) -> None:
    child = _child(cluster, name)
    port = control_address.rsplit(":", 1)[1]
    child.argv = [*child.argv, "--instance-id", instance_id, "--disaggregation-control-port", port]
    cluster.restart(name)


def test_dead_prefill_lease_ends_at_once_and_its_restart_is_a_new_peer(cluster: Cluster) -> None:
    prefill, decode = cluster.instance_urls(Role.PREFILL)[1], cluster.instance_urls(Role.DECODE)[0]
    prefill_id = _info(prefill)["instance_id"]
    with BootstrapClient(cluster.bootstrap_url) as bootstrap:
        old = bootstrap.lookup(prefill_id)
    result: dict = {}
    thread = _room_on_decode_only(decode, prefill_id, result)
    wait_until(lambda: _info(decode)["num_transferring_rooms"] == 1, 30.0, 0.1,
               lambda: f"the room never opened: {result} {_info(decode)}")
    assert _used_pages(decode) > 0
    killed = time.monotonic()
    _restart_with_same_identity(cluster, "prefill-1", prefill_id, old.control_address)
    thread.join(TRANSFER_TIMEOUT_S)
    # The room fails as the prefill's fault, and its pages are free, long before the deadline.
    assert result["status"] == 502, result
    assert result["body"]["error"]["code"] == PREFILL_FAILED_CODE, result
    wait_until(lambda: _used_pages(decode) == 0, 10.0, 0.1, lambda: f"pages still held: {_info(decode)}")
    assert time.monotonic() - killed < TRANSFER_TIMEOUT_S / 3, _log_tails(cluster)
    # The restarted prefill: same instance id and control address, a new epoch; rooms work again.
    wait_until(lambda: is_healthy(prefill), 180.0, 0.5, lambda: f"the restarted prefill is not healthy:\n{_log_tails(cluster)}")

    def new_epoch():
        with BootstrapClient(cluster.bootstrap_url) as bootstrap:
            info = bootstrap.lookup(prefill_id)
        return info if info is not None and info.epoch != old.epoch else None

    new = wait_until(new_epoch, 30.0, 0.2, "the restarted prefill never registered")
    assert new.control_address == old.control_address
    ids = prompt_ids(30, seed=4)
    body = {**generate_body(ids, 5), "bootstrap_room": random.getrandbits(63), "prefill_instance_id": prefill_id}
    with httpx.Client(timeout=60, trust_env=False) as http:
        p = threading.Thread(target=lambda: http.post(f"{prefill}/generate", json=body))
        p.start()
        out = http.post(f"{decode}/generate", json=body)
        p.join(60)
    assert out.status_code == 200 and len(out.json()["output_ids"]) == 5, out.text
    wait_until(lambda: _used_pages(decode) == 0, 20.0, 0.1)
    _wait_router_healthy(cluster)


def test_a_stream_cut_by_a_dying_decode_ends_with_an_error_event_and_done(cluster: Cluster) -> None:
    _wait_router_healthy(cluster)
    body = {"prompt": "a long answer", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    lines: list[str] = []
    with httpx.Client(timeout=120, trust_env=False) as http, \
            http.stream("POST", cluster.base_url + "/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 3:
                busy = [i for i, u in enumerate(cluster.instance_urls(Role.DECODE)) if _info(u)["num_running_reqs"]]
                assert len(busy) == 1, busy
                _signal(cluster, f"decode-{busy[0]}", signal.SIGKILL)
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert '"error"' in lines[-2] and "stream broke" in lines[-2], lines[-3:]


def test_a_dead_decode_lease_ends_at_once_on_the_prefill(cluster: Cluster) -> None:
    """Runs last: it kills the decode instance the previous test left alive."""
    decodes = cluster.instance_urls(Role.DECODE)
    decode = next(u for u in decodes if is_healthy(u))
    prefill = cluster.instance_urls(Role.PREFILL)[0]
    body = {**generate_body(prompt_ids(2000, seed=5), 4), "bootstrap_room": random.getrandbits(63),
            "prefill_instance_id": _info(prefill)["instance_id"]}
    result: dict = {}

    def post(url: str, key: str) -> None:
        try:
            result[key] = httpx.post(f"{url}/generate", json=body, timeout=TRANSFER_TIMEOUT_S + 30,
                                     trust_env=False).status_code
        except httpx.HTTPError as exc:
            result[key] = type(exc).__name__

    threads = [threading.Thread(target=post, args=(u, k)) for u, k in ((prefill, "p"), (decode, "d"))]
    for t in threads:
        t.start()
    wait_until(lambda: _info(prefill)["num_prefill_rooms"] == 1 or "p" in result, 30.0, 0.05,
               lambda: f"the room never paired: {result} {_info(prefill)}")
    assert "p" not in result, f"the room ended before the decode was killed: {result}"
    killed = time.monotonic()
    _signal(cluster, f"decode-{decodes.index(decode)}", signal.SIGKILL)
    for t in threads:
        t.join(TRANSFER_TIMEOUT_S)
    assert result["p"] == 502, result
    wait_until(lambda: _used_pages(prefill) == 0, 10.0, 0.1, lambda: f"prefill pages still held: {_info(prefill)}")
    assert time.monotonic() - killed < TRANSFER_TIMEOUT_S / 3
    assert _info(prefill)["num_draining_rooms"] == 0
