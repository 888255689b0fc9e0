"""One instance's HTTP front (OpenAI + SGLang native API), as ``pdserve serve`` runs it.

The front starts listening at once and answers ``/health`` with 503 until the
engine process has loaded the model and, unless ``--skip-server-warmup``, served
one warmup request. If the engine dies, ``/health`` turns 503 and the server exits.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import uvicorn
from fastapi import FastAPI
from pdserve.common.config import ServerConfig, served_model_name
from pdserve.common.messages import GenerateRequest
from pdserve.common.roles import Role
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.startup import StartupError
from pdserve.server.engine_client import EngineClient, EngineDied, EngineMain
from pdserve.server.metrics import ServerMetrics
from pdserve.server.routes import install_routes
from pdserve.server.serving import ModelLimits, Serving
from pdserve.server.state import AppState, version
from pdserve.web.event_stream import with_raw_send
from pdserve.web.http_timeouts import uvicorn_timeouts
from pdserve.web.tracing import Tracer

logger = logging.getLogger("pdserve.server")
ENGINE_START_TIMEOUT_S = 1800.0
ENGINE_CHECK_INTERVAL_S = 1.0


def _start_engine(state: AppState, loop: asyncio.AbstractEventLoop) -> None:
    """Runs in a thread: start the engine, warm it up, then report healthy."""
    try:
        state.engine_ready = state.engine.start(ENGINE_START_TIMEOUT_S)
        asyncio.run_coroutine_threadsafe(state.engine.attach(), loop).result(timeout=60)
        ready = state.engine_ready
        # The sampler sees the logits' first len(tokenizer) columns (a model's
        # vocabulary is often padded past its tokenizer's): a biased id must be one.
        sampled = min(ready.vocab_size, len(state.tokenizer))
        # Only a colocated engine queues a call's completions where the limit
        # counts them; PD ones wait for their room instead (pairing, pages).
        queued = state.cfg.max_queued_requests if state.cfg.disaggregation_mode == Role.COLOCATED else None
        limits = ModelLimits(ready.context_len, ready.vocab_size, ready.max_total_num_tokens, sampled, queued)
        state.serving = Serving(state.engine, state.tokenizer, limits, state.metrics, state.cfg.allow_auto_truncate, state.cfg.log_requests)
        if not state.cfg.skip_server_warmup:
            asyncio.run_coroutine_threadsafe(_warmup(state), loop).result(timeout=600)
        state.ready = True
        logger.info("The server is fired up and ready to roll! (%s mode on http://%s:%d)", state.cfg.disaggregation_mode, state.cfg.host, state.cfg.port)
    except Exception as exc:
        if state.engine.stopping:
            return  # stopped while starting (Ctrl-C): nothing failed
        # The engine already said why it did not start; other failures name their type.
        state.failed = str(exc) if isinstance(exc, EngineDied) else f"{type(exc).__name__}: {exc}"
        logger.error("engine failed to start: %s", state.failed)
        if state.server is not None:
            state.server.should_exit = True


async def _warmup(state: AppState) -> None:
    ids = state.tokenizer.encode("The capital of France is")
    req = GenerateRequest(rid="warmup", input_ids=ids, params=SamplingParams(max_new_tokens=4, temperature=0.0))
    if state.cfg.disaggregation_mode == Role.PREFILL:
        return  # a prefill instance only runs rooms paired with a decode instance
    out = await state.engine.finish(req)
    if out.error:
        raise RuntimeError(f"warmup failed: {out.error}")


async def _watch_engine(state: AppState) -> None:
    while True:
        await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)
        if state.ready and not state.engine.alive() and not state.engine.stopping:
            state.ready = False
            state.failed = state.engine.death_reason()
            logger.error("%s; shutting down", state.failed)
            if state.server is not None:
                state.server.should_exit = True
            return


class _FrontServer(uvicorn.Server):
    """uvicorn's server, which marks the engine's exit as expected the moment a
    stop signal arrives: a signal to the whole process group (``pdserve up``, a
    supervisor) ends the engine too, often before uvicorn's shutdown begins."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient):
        super().__init__(config)
        self._engine = engine

    def handle_exit(self, sig: int, frame: object) -> None:
        self._engine.stopping = True
        super().handle_exit(sig, frame)


def build_app(state: AppState) -> FastAPI:
    app = FastAPI(title="pdserve", version=version())
    app.state.pd = state

    @app.on_event("startup")
    async def _startup() -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=_start_engine, args=(state, loop), name="engine-start", daemon=True).start()
        app.state.watcher = asyncio.create_task(_watch_engine(state))

    @app.on_event("shutdown")
    async def _shutdown() -> None:
        state.engine.shutdown()

    install_routes(app, state)
    return app


def run(cfg: ServerConfig, model_dir: str, engine_main: EngineMain) -> int:
    """Serve until shut down; 1 if the engine failed, StartupError if it never started."""
    from pdserve.server.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer_path or model_dir, cfg.chat_template)
    model_name = served_model_name(cfg)
    engine = EngineClient(cfg, model_dir, engine_main, len(tokenizer))
    state = AppState(cfg, model_dir, model_name, tokenizer, engine, ServerMetrics(cfg.enable_metrics, model_name, cfg.metrics, cfg.disaggregation_mode),
                     tracer=Tracer(f"pdserve-{cfg.disaggregation_mode.name.lower()}", cfg.metrics.otlp_traces_endpoint))
    app = build_app(state)
    timeouts = uvicorn_timeouts(cfg.http_keep_alive_timeout_s, cfg.http_read_timeout_s)
    server = _FrontServer(uvicorn.Config(with_raw_send(app), host=cfg.host, port=cfg.port, log_level="warning",
                                         timeout_graceful_shutdown=5, **timeouts), engine)
    state.server = server
    try:
        server.run()
    finally:
        state.tracer.shutdown()  # exports the spans still batched
    if state.failed and state.engine_ready is None:
        raise StartupError(state.failed)  # never served: the reason is the start-up's
    return 1 if state.failed else 0
