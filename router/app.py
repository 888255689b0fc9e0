"""``pdserve router``: the PD load balancer and OpenAI-compatible front door.

Generation endpoints (``/v1/completions``, ``/v1/chat/completions``,
``/generate``) go through :mod:`pdserve.router.proxy`. Around them: ``/v1/models``
and ``/get_model_info`` from a healthy worker, ``/workers``, ``/health`` (200
only while every needed role has a healthy worker), ``/health_generate`` (one
token generated through a pair), ``/get_server_info`` (the effective
configuration, live counts, and every instance's own), ``/flush_cache``
(fan-out) and ``/metrics``. With ``--api-key`` every endpoint but ``/health``
(and ``/metrics`` with ``--open-metrics``) needs ``Authorization: Bearer KEY``;
the router presents ``--worker-api-key`` (default: the same key) to its
workers, and the cluster secret to the bootstrap service.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pdserve.common import env
from pdserve.common.args import add_dataclass_args, config_from_args, read_secret
from pdserve.common.errors import APIError
from pdserve.common.startup import flag_error, run_main
from pdserve.common.version import __version__
from pdserve.router.admission import Admission, AdmissionMiddleware
from pdserve.router.config import RouterConfig
from pdserve.router.metrics import CONTENT_TYPE, GAUGE_PUBLISH_S, RouterMetrics
from pdserve.router.policies import POLICIES, Policy, make_policy
from pdserve.router.proxy import Call, Forwarder
from pdserve.router.workers import COLOCATED, DECODE, PREFILL, Worker, WorkerRegistry
from pdserve.web.auth import API_KEY_MESSAGE, BearerAuthMiddleware, bearer_headers, redacted
from pdserve.web.direct_route import DirectRoute
from pdserve.web.disconnect import until_client_leaves
from pdserve.web.errors import error_response, install_error_handlers, read_json_object
from pdserve.web.event_stream import with_raw_send
from pdserve.web.http_timeouts import uvicorn_timeouts
from pdserve.web.openapi import request_body
from pdserve.web.processes import reuse_port_sockets, run_processes
from pdserve.web.request_body import BodyLimit
from pdserve.web.service import LOG_FORMAT, serve_app, serve_on_socket
from pdserve.web.tracing import TIMING_HEADER, Tracer

logger = logging.getLogger("pdserve.router")

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate")
HEALTH_GENERATE_TIMEOUT_S = 30.0


@dataclass
class RouterState:
    """Everything one router owns; lives on ``app.state.router``."""

    config: RouterConfig
    http: httpx.AsyncClient  # health checks, discovery and admin calls
    session: aiohttp.ClientSession  # generation requests: the relayed hot path
    workers: WorkerRegistry
    policies: dict[str, Policy]
    forwarder: Forwarder
    metrics: RouterMetrics


def _make_policies(config: RouterConfig) -> dict[str, Policy]:
    if config.mode == "colocated":
        return {COLOCATED: make_policy(config.policy, config.cache_aware)}
    return {PREFILL: make_policy(config.resolved_prefill_policy, config.cache_aware),
            DECODE: make_policy(config.resolved_decode_policy, config.cache_aware)}


def _build_state(config: RouterConfig, tracer: Tracer | None = None) -> RouterState:
    timeout = httpx.Timeout(config.request_timeout_s, connect=config.health_check_timeout_s)
    # No pool cap: every streamed answer holds a connection for its whole life.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    # Internal traffic: never through an HTTP proxy from the environment.
    # Every call to a worker presents the worker key; discovery replaces it with the cluster secret.
    worker_headers = bearer_headers(config.resolved_worker_api_key)
    http = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False, headers=worker_headers)
    policies = _make_policies(config)

    def forget(worker: Worker) -> None:
        policies[worker.role].forget(worker)

    workers = WorkerRegistry(config, http, on_removed=forget)
    metrics = RouterMetrics(config.bucket_e2e_request_latency, multiprocess=config.processes > 1)
    # No pool cap here either; internal traffic ignores proxies from the environment.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=config.request_timeout_s, sock_connect=config.health_check_timeout_s),
        auto_decompress=False,
        headers=worker_headers,
    )
    tracer = tracer or Tracer("pdserve-router", config.otlp_traces_endpoint)
    forwarder = Forwarder(config, workers, policies, session, metrics, tracer)
    return RouterState(config, http, session, workers, policies, forwarder, metrics)


def _generation_routes(app: FastAPI) -> None:
    """The relayed endpoints, as ``DirectRoute``s: on the path of every first token."""
    async def generate(request: Request) -> Response:
        received_s = time.monotonic()
        state: RouterState = request.app.state.router
        path = request.url.path
        state.metrics.requests.labels(path).inc()
        try:
            body = await read_json_object(request)
        except APIError as exc:
            state.metrics.errors.labels(path, str(exc.status)).inc()
            raise
        try:
            want_timing = body.get("return_timing") is True or request.headers.get(TIMING_HEADER, "").lower() in ("1", "true")
            call = Call(path, body, received_s, want_timing)
            response = await until_client_leaves(request, state.forwarder.forward(call, request.headers))
        except APIError as exc:  # the client left: nobody reads this, but it is counted
            state.metrics.errors.labels(path, str(exc.status)).inc()
            raise
        if response.status_code >= 400:
            state.metrics.errors.labels(path, str(response.status_code)).inc()
        return response

    for path in GENERATE_PATHS:
        app.router.add_api_route(path, generate, methods=["POST"], openapi_extra=request_body(path),
                                 route_class_override=DirectRoute)


async def _from_any_worker(state: RouterState, path: str) -> Response:
    for role in (DECODE, COLOCATED, PREFILL):
        for worker in state.workers.healthy(role):
            try:
                upstream = await state.http.get(worker.url + path,
                                                timeout=state.config.health_check_timeout_s)
            except httpx.HTTPError as exc:
                state.workers.mark_failed(worker, repr(exc))
                continue
            return Response(upstream.content, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type"))
    raise APIError(503, "no healthy workers available")


async def _server_info(state: RouterState, worker: Worker) -> dict[str, Any] | None:
    if not worker.healthy:
        return None
    try:
        upstream = await state.http.get(worker.url + "/get_server_info",
                                        timeout=state.config.health_check_timeout_s)
        return upstream.json() if upstream.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def redacted_config(config: RouterConfig) -> dict[str, Any]:
    """The effective configuration, credentials left out."""
    return redacted(dataclasses.asdict(config))


async def _health_generate(state: RouterState) -> Response:
    """One token generated through a prefill/decode pair (or a colocated worker)."""
    body = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}, "stream": False}
    try:
        call = Call("/generate", body, time.monotonic())
        response = await asyncio.wait_for(state.forwarder.forward(call), HEALTH_GENERATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        return error_response(503, f"generation check failed: no answer within {HEALTH_GENERATE_TIMEOUT_S:.0f}s")
    if response.status_code != 200:
        return error_response(503, f"generation check failed: the workers answered {response.status_code}")
    return JSONResponse({"status": "ok", "mode": state.config.mode})


async def _flush(state: RouterState, worker: Worker) -> dict[str, Any]:
    try:
        upstream = await state.http.post(worker.url + "/flush_cache",
                                         timeout=state.config.health_check_timeout_s)
        return {"role": worker.role, "url": worker.url, "status": upstream.status_code}
    except httpx.HTTPError as exc:
        return {"role": worker.role, "url": worker.url, "status": None, "error": repr(exc)}


def _admin_routes(api: APIRouter) -> None:
    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        return await _from_any_worker(request.app.state.router, "/v1/models")

    @api.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        # Picked from a worker's list: a path built from the id could reach
        # any of the worker's routes, with the router's key.
        listed = await _from_any_worker(request.app.state.router, "/v1/models")
        if listed.status_code != 200:
            return listed
        for card in json.loads(listed.body).get("data", []):
            if card.get("id") == model_id:
                return JSONResponse(card)
        raise APIError(404, f"The model `{model_id}` does not exist.", "model", "model_not_found")

    @api.get("/get_model_info")
    async def model_info(request: Request) -> Response:
        return await _from_any_worker(request.app.state.router, "/get_model_info")

    @api.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        return await _health_generate(request.app.state.router)

    @api.get("/workers")
    async def workers(request: Request) -> list[dict[str, Any]]:
        return [w.to_json() for w in request.app.state.router.workers.all()]

    @api.get("/get_server_info")
    async def server_info(request: Request) -> dict[str, Any]:
        state: RouterState = request.app.state.router
        everyone = state.workers.all()
        infos = await asyncio.gather(*(_server_info(state, w) for w in everyone))
        instances = [{**w.to_json(), "server_info": info} for w, info in zip(everyone, infos, strict=True)]
        return {
            "role": "router",
            "version": __version__,
            "pid": os.getpid(),  # which of --processes answered
            "mode": state.config.mode,
            "policy": {role: type(p).name for role, p in state.policies.items()},
            "config": redacted_config(state.config),
            "num_workers": {role: {"total": sum(w.role == role for w in everyone),
                                   "healthy": len(state.workers.healthy(role))} for role in state.workers.roles},
            "num_in_flight_reqs": sum(w.in_flight for w in everyone),
            "num_running_reqs": sum(w.num_running_reqs for w in everyone if w.healthy),
            "num_queued_reqs": sum(w.num_queued_reqs for w in everyone if w.healthy),
            "instances": instances,
        }

    @api.api_route("/flush_cache", methods=["GET", "POST"])  # as an instance takes it
    async def flush_cache(request: Request) -> JSONResponse:
        state: RouterState = request.app.state.router
        targets = [w for w in state.workers.all() if w.healthy]
        results = await asyncio.gather(*(_flush(state, w) for w in targets))
        failed = [r for r in results if r["status"] != 200]
        if not failed:
            return JSONResponse({"results": results})
        # A refusal (an instance with requests running answers 400) is the caller's to retry
        # when idle; a worker that did not answer is the router's 502. Others may have flushed.
        refused = all(r["status"] is not None and 400 <= r["status"] < 500 for r in failed)
        where = ", ".join(f"{r['role']} {r['url']} ({r['status'] or r.get('error')})" for r in failed)
        flushed = len(results) - len(failed)
        return error_response(400 if refused else 502,
                              f"Cache not flushed on {where}; flushed on {flushed} of {len(results)} workers"
                              + (": retry when no requests are running" if refused else ""))


def _metrics_route(api: APIRouter) -> None:
    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        state: RouterState = request.app.state.router
        return Response(state.metrics.render(state.workers.all()), media_type=CONTENT_TYPE)


async def _publish_gauges(state: RouterState) -> None:
    """One of several processes: keep its share of the per-worker gauges current."""
    while True:
        state.metrics.publish(state.workers.all())
        await asyncio.sleep(GAUGE_PUBLISH_S)


def _quiet_collector() -> None:
    """Freeze what start-up imported and collect young objects less often.

    The relay allocates a few short-lived objects per chunk, so the default
    collector ran every ~700 allocations, each time over everything imported at
    start-up too. Measured with ``serving_cost router`` (five A/B pairs, each
    against sglang-router in the same run): CPU per relayed token against
    sglang's fell from 1.76x to 1.43x on average.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)


def create_app(config: RouterConfig, tracer: Tracer | None = None) -> FastAPI:
    """``tracer``: spans go there instead of ``--otlp-traces-endpoint`` (tests)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = _build_state(config, tracer)
        app.state.router = state
        await state.workers.refresh()
        tasks = [asyncio.create_task(state.workers.run())]
        if state.metrics.multiprocess:
            tasks.append(asyncio.create_task(_publish_gauges(state)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await state.http.aclose()
            await state.session.close()
            state.forwarder.shutdown_tracing()

    app = FastAPI(title="pdserve router", lifespan=lifespan)
    install_error_handlers(app)
    if config.max_concurrent_requests is not None:
        admission = Admission(config.per_process(config.max_concurrent_requests), config.per_process(config.queue_size),
                              config.queue_timeout_s)
        app.add_middleware(AdmissionMiddleware, admission=admission, paths=GENERATE_PATHS)
    if config.api_key:
        # Outside admission: a stranger takes no place in its queue. As on an
        # instance, everything wants the key (the OpenAPI schema and docs too)
        # but /health, and /metrics with --open-metrics.
        open_paths = ("/health", "/metrics") if config.open_metrics else ("/health",)
        app.add_middleware(BearerAuthMiddleware, key=config.api_key, open_paths=open_paths, message=API_KEY_MESSAGE)
    # Added last, so outermost: an oversized body is refused before it waits anywhere.
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)

    @app.get("/health")
    async def health(request: Request) -> Response:
        workers: WorkerRegistry = request.app.state.router.workers
        if workers.ready():
            return JSONResponse({"status": "ok"})
        missing = [role for role in workers.roles if not workers.healthy(role)]
        return error_response(503, f"no healthy {', '.join(missing)} worker")

    _generation_routes(app)
    api = APIRouter()
    _admin_routes(api)
    _metrics_route(api)
    app.include_router(api)
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve router",
                                     description="Run the PD load balancer and OpenAI-compatible front door.")
    names = POLICIES.names()
    add_dataclass_args(parser, RouterConfig, choices={"policy": names, "prefill_policy": names, "decode_policy": names})
    return parser


def parse_args(argv: list[str]) -> RouterConfig:
    parser = build_parser()
    try:
        config = config_from_args(RouterConfig, parser.parse_args(argv))
        secret = read_secret(config.cluster_secret, config.cluster_secret_file, env.CLUSTER_SECRET,
                             "--cluster-secret")
        return replace(config, api_key=config.api_key or env.API_KEY.get(), cluster_secret=secret)
    except ValueError as exc:
        flag_error(parser.prog, str(exc))


def main(argv: list[str]) -> int:
    config = parse_args(argv)
    return run_main("pdserve router", lambda: _serve(config))


def _serve(config: RouterConfig) -> int:
    if config.processes > 1:
        return _serve_processes(config)
    return serve_app(config, lambda: _build_app(config), **_uvicorn_args(config))


def _build_app(config: RouterConfig) -> Any:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check otherwise
    if not (config.prefill_urls or config.decode_urls or config.worker_urls or config.bootstrap_url):
        logger.warning("no workers given: pass --prefill/--decode, --worker or --bootstrap-url")
    logger.info("router (%s mode) on http://%s:%d", config.mode, config.host, config.port)
    app = with_raw_send(create_app(config))
    _quiet_collector()  # the process is the router's alone from here on
    return app


def _uvicorn_args(config: RouterConfig) -> dict[str, Any]:
    return uvicorn_timeouts(config.http_keep_alive_timeout_s, config.http_read_timeout_s)


def _serve_processes(config: RouterConfig) -> int:
    """``--processes N``: N routers on one port, their metrics in one directory."""
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    sockets = reuse_port_sockets(config.host, config.port, config.processes)
    config = replace(config, port=sockets[0].getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="pdserve-router-metrics-") as metrics_dir:
        # prometheus_client's multiprocess mode is switched on by this variable,
        # read when the spawned children import it.
        env.export(env.PROMETHEUS_MULTIPROC_DIR, metrics_dir)
        return run_processes(_serve_process, (config,), sockets, "router")


def _serve_process(config: RouterConfig, index: int, sock: socket.socket) -> None:
    """One of ``--processes``: a whole router on its share of the connections."""
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    logger.info("router process %d of %d (pid %d)", index + 1, config.processes, os.getpid())
    serve_on_socket(config, _build_app(config), sock, **_uvicorn_args(config))
