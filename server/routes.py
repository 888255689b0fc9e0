"""HTTP endpoints of an instance: OpenAI API, SGLang native API, operations."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pdserve.common.errors import APIError
from pdserve.common.messages import ControlKind, ControlResponse, EngineStats, GenerateRequest
from pdserve.common.roles import Role
from pdserve.common.sampling_params import SamplingParams
from pdserve.server import openai_format as fmt
from pdserve.server.engine_client import EngineUnavailable
from pdserve.server.protocol import GenerationInput, parse_chat, parse_completion, parse_generate
from pdserve.server.serving import Serving, SubRequest
from pdserve.server.state import AppState
from pdserve.server.text_stream import ChoiceState
from pdserve.web.auth import API_KEY_MESSAGE, BearerAuthMiddleware
from pdserve.web.direct_route import DirectRoute
from pdserve.web.disconnect import until_client_leaves
from pdserve.web.errors import (
    check_body_encoding,
    error_response,
    install_error_handlers,
    parse_json_object,
)
from pdserve.web.event_stream import EventStream
from pdserve.web.openapi import request_body
from pdserve.web.request_body import BodyLimit
from pdserve.web.tracing import ROUTER_TIME_HEADER, TIMING_HEADER

HEALTH_GENERATE_TIMEOUT_S = 30.0


def install_routes(app: FastAPI, state: AppState) -> None:
    _install_middleware(app, state)
    _install_api(app, state)
    _install_ops(app, state)


def _install_middleware(app: FastAPI, state: AppState) -> None:
    install_error_handlers(app)
    if state.cfg.api_key:
        open_paths = ("/health", "/metrics") if state.cfg.open_metrics else ("/health",)
        app.add_middleware(BearerAuthMiddleware, key=state.cfg.api_key, open_paths=open_paths,
                           message=API_KEY_MESSAGE)
    # Added last, so outermost: an oversized body is refused before anything else runs.
    app.add_middleware(BodyLimit, max_bytes=state.cfg.max_request_bytes)


def _serving(state: AppState) -> Serving:
    if not state.ready or state.serving is None:
        raise APIError(503, "the server is not ready yet" if not state.failed else f"the server failed: {state.failed}")
    return state.serving


def _check_model(state: AppState, gen: GenerationInput) -> None:
    if gen.model is not None and gen.model not in (state.model_name, state.cfg.model_path):
        raise APIError(404, f"The model `{gen.model}` does not exist.", "model", "model_not_found")


def _check_role(state: AppState, gen: GenerationInput) -> None:
    if state.cfg.disaggregation_mode == Role.PREFILL and gen.bootstrap_room is None:
        raise APIError(400, "a prefill instance serves only PD requests (with bootstrap_room) sent by the router", "bootstrap_room")


# The generation endpoints: (body parser, kind of answer).
GENERATION_ROUTES = {
    "/v1/completions": (parse_completion, "completion"),
    "/v1/chat/completions": (parse_chat, "chat"),
    "/generate": (parse_generate, "generate"),
}


def _install_api(app: FastAPI, state: AppState) -> None:
    for path, (parser, kind) in GENERATION_ROUTES.items():
        # DirectRoute: the handler reads the raw body itself, so FastAPI's own
        # per-request work around it would be pure cost on every first token.
        app.router.add_api_route(path, _endpoint(state, parser, kind), methods=["POST"], name=kind,
                                 openapi_extra=request_body(path), route_class_override=DirectRoute)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", "model", "model_not_found")
        return _model_card(state)


def _endpoint(state: AppState, parser, kind: str):
    async def endpoint(request: Request):
        return await _handle(request, state, parser, kind)

    return endpoint


def _model_card(state: AppState) -> dict:
    return {
        "id": state.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "pdserve",
        "root": state.model_dir,
        "max_model_len": state.engine_ready.context_len if state.engine_ready else None,
    }


def _prepare(state: AppState, serving: Serving, parser, raw: bytes,
             received_s: float) -> tuple[GenerationInput, list[SubRequest]]:
    """Body bytes to engine requests: parse, check, template, tokenize (CPU work only)."""
    gen = parser(parse_json_object(raw))
    _check_model(state, gen)
    _check_role(state, gen)
    return gen, serving.build(gen, received_s)


async def _handle(request: Request, state: AppState, parser, kind: str):
    received_s = time.monotonic()
    serving = _serving(state)
    check_body_encoding(request)
    raw = await request.body()
    gen, subs = await serving.off_loop(len(raw), partial(_prepare, state, serving, parser, raw, received_s))
    journey = _journey_maker(state, request, gen)
    trace = _trace_maker(state, request, gen, received_s)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{subs[0].rid.split('-')[0]}"
    if state.cfg.disaggregation_mode == Role.PREFILL:
        trace(await until_client_leaves(request, serving.collect_all(subs)))
        return {"bootstrap_room": gen.bootstrap_room, "status": "ok"}
    if gen.stream:
        states = [ChoiceState(s.index) for s in subs]
        events = serving.stream(subs[0], states[0]) if len(subs) == 1 else serving.merged(subs, states)
        # Wait for the first delta before answering: a request the engine rejects
        # (queue full, pool too small) then gets its real status, not a 200 stream.
        first = await until_client_leaves(request, _first_event(events))
        return EventStream(partial(_stream, state, gen, subs, states, rid, kind, first, events, journey, trace))
    start_s = time.monotonic()
    choices = await until_client_leaves(request, serving.collect_all(subs))
    trace(choices)
    return _body(state, gen, kind, rid, choices, time.monotonic() - start_s, journey)


def _body(state: AppState, gen: GenerationInput, kind: str, rid: str, choices: list[ChoiceState], e2e_s: float,
          journey: Journey | None = None):
    want_lp = gen.params.logprobs
    if kind in ("completion", "chat"):
        make = fmt.completion_body if kind == "completion" else fmt.chat_body
        body = make(rid, state.model_name, choices, state.tokenizer, want_lp, gen.n)
        if journey is not None:
            body["timing"] = journey(choices[0])
        return body
    bodies = [fmt.generate_body(rid, c, e2e_s, len(choices) > 1) for c in choices]
    if journey is not None:
        for b, c in zip(bodies, choices):
            b["meta_info"]["timing"] = journey(c)
    return bodies[0] if len(bodies) == 1 else bodies


# The phases of a request's journey, in the order it passes them.
JOURNEY_PHASES = ("router_queue_and_pick", "front", "decode_wait_pages", "prefill_bootstrap", "prefill_queue",
                  "prefill", "kv_transfer", "decode_queue", "decode")
Journey = Callable[[ChoiceState], dict]


def _journey_maker(state: AppState, request: Request, gen: GenerationInput) -> Journey | None:
    """What builds a choice's ``timing``, when the call asked for it (body or header)."""
    if not (gen.return_timing or request.headers.get(TIMING_HEADER, "").lower() in ("1", "true")):
        return None
    try:
        router_s = float(request.headers.get(ROUTER_TIME_HEADER, ""))
    except ValueError:
        router_s = None
    if router_s is not None and not 0 <= router_s < math.inf:  # not a router's: ignored
        router_s = None

    def journey(choice: ChoiceState) -> dict:
        measured = dict(choice.timing or {})
        if router_s is not None:
            measured["router_queue_and_pick"] = router_s
        phases = {p: measured.pop(p) for p in JOURNEY_PHASES if p in measured} | measured
        return {"phases_s": phases, "total_s": sum(phases.values()), "instance_id": state.cfg.instance_id,
                "prefill_instance_id": gen.prefill_instance_id}

    return journey


def _trace_maker(state: AppState, request: Request, gen: GenerationInput, received_s: float) -> Callable[[list[ChoiceState]], None]:
    """What records the call's span (and its phases) once it is done; a no-op without tracing."""
    if not state.tracer.enabled:
        return lambda choices: None
    role = state.cfg.disaggregation_mode
    attributes = {"pdserve.instance_id": state.cfg.instance_id or "", "pdserve.role": role.name.lower(),
                  "pdserve.bootstrap_room": gen.bootstrap_room if gen.bootstrap_room is not None else -1}

    def trace(choices: list[ChoiceState]) -> None:
        phases = {k: v for k, v in (choices[0].timing or {}).items() if k != "front"} if choices else {}
        state.tracer.record(f"pdserve.{role.name.lower()}", received_s, time.monotonic(), phases,
                            request.headers, attributes)

    return trace


async def _first_event(events: AsyncIterator) -> object | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _stream(
    state: AppState,
    gen: GenerationInput,
    subs: list[SubRequest],
    states: list[ChoiceState],
    rid: str,
    kind: str,
    first: object | None,
    rest: AsyncIterator,
    journey: Journey | None,
    trace: Callable[[list[ChoiceState]], None],
    write: Callable[[bytes], Awaitable[None]],
) -> None:
    model = state.model_name
    if kind == "chat":
        for s in subs:
            await write(fmt.sse(fmt.chat_chunk(rid, model, s.index, None, state.tokenizer, False)))
    event = _event_maker(state, gen, subs, states, rid, kind, journey)
    try:
        if first is not None:
            await write(event(first))
            async for item in rest:
                await write(event(item))
    except APIError as exc:
        await write(fmt.sse(exc.body()))
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    if gen.include_usage and kind != "generate":
        chunk = fmt.usage_chunk(rid, model, obj, states, gen.n)
        if journey is not None:  # the last chunk carries the journey
            chunk["timing"] = journey(states[0])
        await write(fmt.sse(chunk))
    elif journey is not None and kind != "generate":
        chunk = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
                 "timing": journey(states[0])}
        await write(fmt.sse(chunk))
    await write(fmt.sse("[DONE]"))
    trace(states)


def _event_maker(state: AppState, gen: GenerationInput, subs: list[SubRequest], states: list[ChoiceState],
                 rid: str, kind: str, journey: Journey | None = None) -> Callable[[object], bytes]:
    """The SSE bytes of one stream item: a delta (one choice) or ``(index, delta)`` (several)."""
    want_lp, model, start_s = gen.params.logprobs, state.model_name, time.monotonic()
    plain = [fmt.TextChunks(rid, model, s.index, kind == "chat") for s in subs] if kind != "generate" and not want_lp else None
    single = len(subs) == 1
    offsets = [0] * len(subs)  # per choice: characters of the tokens streamed so far (text_offset)

    def event(item: object) -> bytes:
        i, delta = (0, item) if single else item
        if plain is not None and delta.finish_reason is None:
            return plain[i].event(delta.text)
        if kind == "chat":
            return fmt.sse(fmt.chat_chunk(rid, model, subs[i].index, delta, state.tokenizer, want_lp))
        if kind == "completion":
            chunk = fmt.completion_chunk(rid, model, subs[i].index, delta, state.tokenizer, want_lp, offsets[i])
            lp = chunk["choices"][0]["logprobs"]
            if lp and lp["tokens"]:
                offsets[i] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            return fmt.sse(chunk)
        body = fmt.generate_body(rid, states[i], time.monotonic() - start_s, not single)
        if journey is not None and delta.finish_reason is not None:
            body["meta_info"]["timing"] = journey(states[i])
        return fmt.sse(body)

    return event


async def _control(state: AppState, kind: ControlKind) -> ControlResponse:
    """A control round trip; an engine that died or does not answer is a 503."""
    try:
        return await state.engine.control(kind)
    except EngineUnavailable as exc:
        raise APIError(503, str(exc)) from exc


async def _engine_stats(state: AppState) -> EngineStats | None:
    """The engine's stats; None from an engine that keeps none (a stand-in)."""
    return (await _control(state, ControlKind.STATS)).stats


def _install_ops(app: FastAPI, state: AppState) -> None:
    @app.get("/health")
    async def health():
        if state.ready and state.engine.alive():
            return {"status": "ok", "role": state.cfg.disaggregation_mode}
        return error_response(503, state.failed or "not ready")  # with Retry-After

    @app.get("/health_generate")
    async def health_generate():
        if not state.ready or state.cfg.disaggregation_mode == Role.PREFILL:
            # A prefill instance cannot generate alone; its engine liveness is the check.
            return await health()
        req = GenerateRequest(rid=f"health-{time.monotonic_ns()}", input_ids=[0], params=SamplingParams(max_new_tokens=1, temperature=0.0))

        async def run() -> None:
            out = await state.engine.finish(req)
            if out.error:
                raise APIError(503, out.error)

        try:
            await asyncio.wait_for(run(), HEALTH_GENERATE_TIMEOUT_S)
        except (asyncio.TimeoutError, APIError) as exc:
            return error_response(503, f"generation check failed: {exc}")
        return {"status": "ok", "role": state.cfg.disaggregation_mode}

    @app.get("/get_model_info")
    async def model_info():
        return {
            "model_path": state.model_dir,
            "tokenizer_path": state.cfg.tokenizer_path or state.model_dir,
            "served_model_name": state.model_name,
            "is_generation": True,
        }

    @app.get("/get_server_info")
    async def server_info():
        info = state.server_info()
        if state.ready and state.engine.alive():
            stats = await _engine_stats(state)
            info.update(stats.to_json() if stats is not None else {})
        return info

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        _serving(state)
        resp = await _control(state, ControlKind.FLUSH_CACHE)
        if not resp.ok:
            raise APIError(400, f"Cache not flushed: {resp.message}")
        return Response("Cache flushed.\n", status_code=200)

    @app.get("/metrics")
    async def metrics():
        if not state.cfg.enable_metrics:
            raise APIError(404, "metrics are disabled; start with --enable-metrics")
        if state.ready and state.engine.alive():
            state.metrics.update_engine(await _engine_stats(state))
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")
