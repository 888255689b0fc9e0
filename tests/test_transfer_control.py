"""The PD control channel: framing, both directions, many clients, dead peers."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import pytest
from pdserve.common.codec import message
from pdserve.tests.support.ports import free_port
from pdserve.tests.support.waiting import wait_until
from pdserve.transfer.control import ControlClient, ControlClosedError, ControlServer, split_address


@message
@dataclass(frozen=True, kw_only=True)
class _Ping:
    seq: int
    payload: bytes = b""


def _wait_for(fetch, count: int, timeout_s: float = 5.0) -> list:
    """What ``fetch`` hands out, gathered until there are ``count`` items."""
    got: list = []

    def enough() -> bool:
        got.extend(fetch())
        return len(got) >= count

    wait_until(enough, timeout_s, 0.005, lambda: f"{len(got)} of {count} items: {got}")
    return got


@pytest.fixture
def server():
    srv = ControlServer("127.0.0.1", 0)
    try:
        yield srv
    finally:
        srv.close()


def test_round_trip_in_order_with_large_frames(server):
    client = ControlClient(server.address)
    try:
        big = bytes(range(256)) * 8192  # 2 MiB: many partial socket writes
        for i in range(50):
            client.send(_Ping(seq=i, payload=big if i == 25 else b""))
        got = _wait_for(server.recv_nowait, 50)
        assert [m.seq for _, m in got] == list(range(50))
        assert got[25][1].payload == big
        conn_id = got[0][0]
        server.send(conn_id, _Ping(seq=999))
        assert _wait_for(client.recv_nowait, 1) == [_Ping(seq=999)]
    finally:
        client.close()


def test_server_tells_clients_apart_and_reports_closed(server):
    a, b = ControlClient(server.address), ControlClient(server.address)
    a.send(_Ping(seq=1))
    b.send(_Ping(seq=2))
    got = dict((m.seq, cid) for cid, m in _wait_for(server.recv_nowait, 2))
    assert set(got) == {1, 2} and got[1] != got[2]
    server.send(got[2], _Ping(seq=20))
    assert _wait_for(b.recv_nowait, 1) == [_Ping(seq=20)]
    assert a.recv_nowait() == []
    a.close()
    assert _wait_for(server.closed_connections, 1) == [got[1]]
    with pytest.raises(ControlClosedError):
        server.send(got[1], _Ping(seq=3))
    b.close()


def test_client_gives_up_on_dead_address_without_hanging():
    client = ControlClient(f"127.0.0.1:{free_port()}", max_retries=2, retry_interval_s=0.01)
    try:
        wait_until(lambda: client.closed, 5.0, 0.01, "the client kept trying a dead address")
        assert client.closed and "cannot connect" in client.error
        with pytest.raises(ControlClosedError):
            client.send(_Ping(seq=1))
    finally:
        client.close()


def test_client_reconnects_after_server_restart():
    port = free_port()
    first = ControlServer("127.0.0.1", port)
    client = ControlClient(f"127.0.0.1:{port}", max_retries=50, retry_interval_s=0.02)
    try:
        client.send(_Ping(seq=1))
        assert len(_wait_for(first.recv_nowait, 1)) == 1
        first.close()
        wait_until(lambda: not client.connected, message="the client never noticed the drop")
        second = ControlServer("127.0.0.1", port)
        try:
            client.send(_Ping(seq=2))
            got = _wait_for(second.recv_nowait, 1)
            assert [m.seq for _, m in got] == [2]
            assert not client.closed
        finally:
            second.close()
    finally:
        client.close()


def test_garbage_frame_drops_only_that_connection(server):
    host, port = split_address(server.address)
    with socket.create_connection((host, port)) as raw:
        raw.sendall(b"\x00\x00\x00\x03abc")  # a frame that is not msgpack of a message
        assert len(_wait_for(server.closed_connections, 1)) == 1
    good = ControlClient(server.address)
    try:
        good.send(_Ping(seq=7))
        assert [m.seq for _, m in _wait_for(server.recv_nowait, 1)] == [7]
    finally:
        good.close()


def test_split_address_rejects_garbage():
    assert split_address("10.0.0.1:8999") == ("10.0.0.1", 8999)
    with pytest.raises(ValueError):
        split_address("no-port")


def test_greeting_opens_every_connection_and_a_restart_greets_anew():
    port = free_port()
    first = ControlServer("127.0.0.1", port, greeting=_Ping(seq=100))
    client = ControlClient(f"127.0.0.1:{port}", max_retries=50, retry_interval_s=0.02)
    try:
        client.send(_Ping(seq=1))
        assert [m.seq for m in _wait_for(client.recv_nowait, 1)] == [100]
        first.close()
        wait_until(lambda: not client.connected, message="the client never noticed the drop")
        second = ControlServer("127.0.0.1", port, greeting=_Ping(seq=200))
        try:
            client.send(_Ping(seq=2))
            _wait_for(second.recv_nowait, 1)
            # The new server's greeting tells the client it is not the old one.
            assert [m.seq for m in _wait_for(client.recv_nowait, 1)] == [200]
        finally:
            second.close()
    finally:
        client.close()


def test_a_refused_connection_is_final_when_asked():
    port = free_port()
    server = ControlServer("127.0.0.1", port)
    client = ControlClient(f"127.0.0.1:{port}", max_retries=50, retry_interval_s=0.02, final_when_refused=True)
    try:
        client.send(_Ping(seq=1))
        _wait_for(server.recv_nowait, 1)
        server.close()  # nothing listens at the address any more
        started = time.monotonic()
        wait_until(lambda: client.closed, 5.0, 0.01, "the client kept retrying a refused address")
        assert client.refused and "refused" in client.error
        assert time.monotonic() - started < 2.0  # not after 50 retries
    finally:
        client.close()
