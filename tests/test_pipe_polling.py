"""The pipe between an engine and its front, polled instead of slept on (GPU
engines with ``--busy-poll``): the engine takes a message the moment it
arrives and otherwise waits out its usual time; the front's event loop stops
sleeping while requests are open and sleeps again once they are done."""

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


def test_only_gpu_engines_poll_and_only_with_busy_poll() -> None:
    assert ServerConfig(busy_poll=True).polls_pipe("cuda:0")
    assert not ServerConfig(busy_poll=True).polls_pipe("cpu")
    assert not ServerConfig().polls_pipe("cuda:0")


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


def test_the_front_loop_polls_while_requests_are_open_and_sleeps_when_they_are_done(monkeypatch) -> None:
    client = EngineClient(ServerConfig(device="cpu"), "unused", engine_main=print)  # never started: the pipe buffers
    monkeypatch.setattr(client, "alive", lambda: True)
    client._spin = True  # as start() sets it for an engine on a GPU

    async def run() -> tuple[list, list]:
        await client.attach()
        timeouts = _selector_timeouts(asyncio.get_running_loop())
        client.open(GenerateRequest(rid="a", input_ids=[1, 2], params=SamplingParams()))
        await asyncio.sleep(0.05)  # a timer: a sleeping loop would wait on its sockets for it
        while_open = list(timeouts)
        client.close("a", abort=False)
        timeouts.clear()
        await asyncio.sleep(0.2)
        return while_open, list(timeouts)

    while_open, after = asyncio.new_event_loop().run_until_complete(run())
    assert len(while_open) > 10 and all(t == 0 for t in while_open)
    assert not client._spinning
    assert any(t is None or t > 0.01 for t in after)


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
