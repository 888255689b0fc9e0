"""An engine that stops answering control requests: the client's timeout
becomes ``EngineBusy``, and the HTTP routes that ask the engine (server info,
cache flush, metrics) answer 503 with an OpenAI-style error instead of 500."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pdserve.common.config import ServerConfig
from pdserve.common.messages import ControlKind
from pdserve.server.engine_client import EngineBusy, EngineClient, EngineDied
from pdserve.server.metrics import ServerMetrics
from pdserve.server.routes import install_routes
from pdserve.server.state import AppState
from pdserve.tests.support.openai_errors import assert_openai_error


def test_a_control_request_nobody_answers_raises_engine_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    client = EngineClient(ServerConfig(device="cpu"), "unused", engine_main=print)  # never started: nobody reads the pipe
    monkeypatch.setattr(client, "alive", lambda: True)

    async def ask() -> None:
        await client.attach()  # the loop owns the pipe; the other end is never read
        await client.control(ControlKind.STATS, timeout_s=0.05)

    with pytest.raises(EngineBusy, match="did not answer 'stats' within 0.05 s"):
        asyncio.run(ask())
    assert not client._control  # the abandoned request is forgotten


class _SilentEngine:
    """Alive, but every control request ends as the client ends an unanswered one."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.asked: list[str] = []

    def alive(self) -> bool:
        return True

    async def control(self, kind: ControlKind, timeout_s: float = 30.0):
        self.asked.append(kind)
        raise self.error


@pytest.mark.parametrize("error", [EngineBusy("the engine did not answer 'stats' within 30 s"),
                                   EngineDied("engine process died")])
def test_routes_that_ask_the_engine_answer_503(error: Exception) -> None:
    cfg = ServerConfig(device="cpu", enable_metrics=True)
    engine = _SilentEngine(error)
    state = AppState(cfg=cfg, model_dir="unused", model_name="m", tokenizer=None, engine=engine,
                     metrics=ServerMetrics(True, "m"), serving=object(), ready=True)
    app = FastAPI()
    install_routes(app, state)
    with TestClient(app) as http:
        for method, path in (("GET", "/get_server_info"), ("POST", "/flush_cache"), ("GET", "/metrics")):
            assert_openai_error(http.request(method, path), 503, str(error), code=503)
    assert engine.asked == ["stats", "flush_cache", "stats"]
