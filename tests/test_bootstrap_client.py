"""BootstrapClient against a real bootstrap service, including its restart."""

from __future__ import annotations

import logging
import threading

import httpx
import pytest
from pdserve.bootstrap.client import BootstrapClient, RegistrationRefused
from pdserve.bootstrap.protocol import TOKEN_HEADER
from pdserve.bootstrap.server import BootstrapConfig, create_app
from pdserve.tests.support.fake_worker import make_info
from pdserve.tests.support.server_thread import ServerThread
from pdserve.tests.support.waiting import wait_until


@pytest.fixture
def service():
    with ServerThread(create_app(BootstrapConfig(ttl_s=5.0))) as server:
        yield server


def test_register_lookup_list_deregister(service: ServerThread) -> None:
    with BootstrapClient(service.url, timeout_s=2.0) as client:
        p, d = make_info("p1"), make_info("d1", role="decode")
        client.register(p)
        client.register(d)
        assert client.lookup("p1") == p
        assert client.lookup("nope") is None
        assert [i.instance_id for i in client.list(role="decode")] == ["d1"]
        assert {i.instance_id for i in client.list()} == {"p1", "d1"}
        assert client.heartbeat("p1") is True
        client.deregister("p1")
        client.deregister("p1")  # already gone: not an error
        assert client.lookup("p1") is None
        assert client.heartbeat("p1") is False


def test_register_refused_names_the_conflict(service: ServerThread) -> None:
    with BootstrapClient(service.url) as client:
        client.register(make_info("p1"))
        with pytest.raises(RegistrationRefused, match="num_kv_heads.*=8.*=2"):
            client.register(make_info("d1", role="decode", num_kv_heads=8))


def _failed_heartbeats(caplog: pytest.LogCaptureFixture) -> int:
    return sum("heartbeat failed" in r.getMessage() for r in list(caplog.records))


def test_heartbeat_loop_reregisters_after_the_service_restarts(service: ServerThread,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    info, stop = make_info("p1"), threading.Event()
    client = BootstrapClient(service.url, timeout_s=1.0)
    client.register(info)
    beat = threading.Thread(target=client.heartbeat_forever, args=(info, 0.05, stop), daemon=True)
    caplog.set_level(logging.WARNING, logger="pdserve.bootstrap.client")
    beat.start()
    try:
        service.stop()
        wait_until(lambda: _failed_heartbeats(caplog) >= 3, message="no heartbeat failed while the service was down")
        restarted = ServerThread(create_app(BootstrapConfig()), port=service.port).start()
        try:
            with BootstrapClient(restarted.url) as probe:
                wait_until(lambda: probe.lookup("p1") == info, message="not re-registered after the restart")
                # Forgotten again (deleted by its owner's token): the next heartbeat restores it.
                gone = httpx.delete(restarted.url + "/instances/p1", headers={TOKEN_HEADER: client.token})
                assert gone.status_code == 200
                wait_until(lambda: probe.lookup("p1") == info, message="not re-registered after deregister")
        finally:
            restarted.stop()
    finally:
        stop.set()
        beat.join(5.0)
        client.close()
    assert not beat.is_alive()
