"""The pipe between an engine and its front, polled instead of slept on (GPU
engines, while at most ``--poll-pipe-max-requests`` requests are open): the
engine takes a message the moment it arrives and otherwise waits out its
usual time; the front's event loop stops sleeping while a few requests are
open and sleeps again once they are done or many."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from pdserve.common import codec
from pdserve.common.config import ServerConfig
from pdserve.common.messages import GenerateRequest
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.engine import Engine
from pdserve.server.engine_client import EngineClient
from pdserve.web.direct_route import DirectRoute


def test_gpu_engines_poll_by_default_up_to_the_limit_and_cpu_engines_never() -> None:
    assert ServerConfig().pipe_poll_limit("cuda:0") == 8
    assert ServerConfig(poll_pipe_max_requests=2).pipe_poll_limit("cuda:1") == 2
    assert ServerConfig(poll_pipe_max_requests=0).pipe_poll_limit("cuda:0") == 0
    assert ServerConfig().pipe_poll_limit("cpu") == 0
    with pytest.raises(ValueError, match="--poll-pipe-max-requests must be >= 0"):
        ServerConfig(poll_pipe_max_requests=-1).validate()


@pytest.mark.parametrize("spin", [True, False])
def test_an_idle_engine_takes_a_request_as_it_arrives_and_otherwise_waits_its_time(model_dir: str, spin: bool) -> None:
    cfg = ServerConfig(model_path=model_dir, device="cpu").resolve()
    ours, theirs = mp.Pipe()
    engine = Engine(cfg, model_dir, ours)
    assert not engine.spin_while_idle  # a CPU engine sleeps; the GPU's choice is set here
    engine.spin_while_idle = spin

    start = time.monotonic()
    assert not engine._wait_for_front(0.05)
    assert 0.05 <= time.monotonic() - start < 5.0

    req = GenerateRequest(rid="r1", input_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=1))
    threading.Timer(0.02, theirs.send_bytes, args=(codec.encode(req),)).start()
    deadline_s = time.monotonic() + 10.0
    while not engine.scheduler.waiting and time.monotonic() < deadline_s:
        assert engine._receive()  # idle: each call waits up to the role's idle time
    assert [r.rid for r in engine.scheduler.waiting] == ["r1"]


def _selector_timeouts(loop: asyncio.AbstractEventLoop) -> list[float | None]:
    """The timeout of every wait of ``loop`` on its sockets from now on."""
    timeouts: list[float | None] = []
    select = loop._selector.select

    def recorded(timeout=None):
        timeouts.append(timeout)
        return select(timeout)

    loop._selector.select = recorded
    return timeouts


def _request(rid: str) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=[1, 2], params=SamplingParams())


def _front(monkeypatch, poll_limit: int) -> EngineClient:
    client = EngineClient(ServerConfig(device="cpu"), "unused", engine_main=print)  # never started: the pipe buffers
    monkeypatch.setattr(client, "alive", lambda: True)
    client._poll_limit = poll_limit  # as start() sets it for an engine on a GPU
    return client


async def _waits_while(timeouts: list) -> list:
    """The loop's waits on its sockets over a 50 ms timer (a sleeping loop
    waits on them for the timer; a polling one never blocks)."""
    timeouts.clear()
    await asyncio.sleep(0.05)
    return list(timeouts)


def _polled(waits: list) -> bool:
    assert waits
    return all(t == 0 for t in waits)


def test_the_front_loop_polls_while_requests_are_open_and_sleeps_when_they_are_done(monkeypatch) -> None:
    client = _front(monkeypatch, poll_limit=8)

    async def run() -> tuple[list, list]:
        await client.attach()
        timeouts = _selector_timeouts(asyncio.get_running_loop())
        client.open(_request("a"))
        while_open = await _waits_while(timeouts)
        client.close("a", abort=False)
        timeouts.clear()
        await asyncio.sleep(0.2)
        return while_open, list(timeouts)

    while_open, after = asyncio.new_event_loop().run_until_complete(run())
    assert len(while_open) > 10 and _polled(while_open)
    assert not client._spinning
    assert any(t is None or t > 0.01 for t in after)


def test_the_front_loop_sleeps_while_more_requests_than_the_limit_are_open(monkeypatch) -> None:
    client = _front(monkeypatch, poll_limit=2)

    async def run() -> list[bool]:
        await client.attach()
        timeouts = _selector_timeouts(asyncio.get_running_loop())
        polled = []
        for rid in "abc":  # two open: polls; three: sleeps
            client.open(_request(rid))
            polled.append(_polled(await _waits_while(timeouts)))
        client.close("c", abort=False)  # back to two: polls again
        polled.append(_polled(await _waits_while(timeouts)))
        return polled

    assert asyncio.new_event_loop().run_until_complete(run()) == [True, True, False, True]


def test_a_front_with_no_poll_limit_always_sleeps(monkeypatch) -> None:
    client = _front(monkeypatch, poll_limit=0)

    async def run() -> bool:
        await client.attach()
        timeouts = _selector_timeouts(asyncio.get_running_loop())
        client.open(_request("a"))
        return _polled(await _waits_while(timeouts))

    assert not asyncio.new_event_loop().run_until_complete(run())


def test_a_direct_route_answers_with_content_as_json_and_keeps_its_openapi_entry() -> None:
    app = FastAPI()

    async def echo(request: Request):
        return {"path": request.url.path, "body": (await request.body()).decode()}

    app.router.add_api_route("/echo", echo, methods=["POST"], route_class_override=DirectRoute)
    with TestClient(app) as http:
        assert http.post("/echo", content=b"hi").json() == {"path": "/echo", "body": "hi"}
        assert "/echo" in http.get("/openapi.json").json()["paths"]


def test_a_direct_route_refuses_dependencies_it_would_not_run() -> None:
    def guard() -> None:
        raise AssertionError("never called")

    app = FastAPI()
    with pytest.raises(ValueError, match="dependencies would not run"):
        app.router.add_api_route("/x", lambda request: {}, methods=["POST"], dependencies=[Depends(guard)],
                                 route_class_override=DirectRoute)
