"""The router against fake instances: PD forwarding, streaming, retries, admin endpoints."""

from __future__ import annotations

import gzip
import json
import logging
import time
from dataclasses import replace

import httpx
import pytest
from pdserve.bootstrap.client import BootstrapClient, BootstrapError
from pdserve.bootstrap.server import BootstrapConfig
from pdserve.bootstrap.server import create_app as create_bootstrap_app
from pdserve.router.app import parse_args
from pdserve.router.config import RouterConfig
from pdserve.tests.support.fake_worker import make_info
from pdserve.tests.support.openai_errors import assert_openai_error
from pdserve.tests.support.router_stack import FAST, PROMPT, Stack, pd
from pdserve.tests.support.server_thread import ServerThread
from pdserve.tests.support.waiting import wait_until


def test_pd_sends_same_body_with_room_and_prefill_id_to_both(stack: Stack) -> None:
    pd(stack)
    p, d = stack.fakes["p0"], stack.fakes["d0"]
    response = stack.post("/v1/completions", json=PROMPT)
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == "[d0] tok1 tok2"
    stack.wait_nothing_in_flight()
    (p_body,), (d_body,) = p.bodies(), d.bodies()
    assert p_body == d_body
    room = p_body.pop("bootstrap_room")
    assert isinstance(room, int) and 0 <= room < 2**63
    assert p_body.pop("prefill_instance_id") == p.instance_id
    assert p_body == PROMPT
    stack.post("/v1/completions", json=PROMPT)
    stack.wait_nothing_in_flight()
    assert p.bodies()[1]["bootstrap_room"] != room  # a fresh room per request


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_pd_streams_decode_sse_through_unchanged(stack: Stack, path: str) -> None:
    pd(stack, num_chunks=5)
    body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else PROMPT
    with stack.http.stream("POST", stack.router.url + path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        received = b"".join(r.iter_raw())
    assert received == stack.fakes["d0"].sse_bytes(path)
    stack.wait_nothing_in_flight()  # a fake D may finish before the router's call to P arrived
    assert len(stack.fakes["p0"].bodies(path)) == 1


def test_round_robin_alternates_prefill_and_decode(stack: Stack) -> None:
    pd(stack, num_prefill=2, num_decode=2)
    for _ in range(4):
        assert stack.post("/v1/completions", json=PROMPT).status_code == 200
    stack.wait_nothing_in_flight()
    assert [len(stack.fakes[n].requests) for n in ("p0", "p1", "d0", "d1")] == [2, 2, 2, 2]


def test_power_of_two_avoids_the_loaded_decode(stack: Stack) -> None:
    stack.fake("prefill", "p0")
    stack.fake("decode", "busy", num_running_reqs=40)
    stack.fake("decode", "idle")
    stack.start_router(replace(FAST, decode_policy="power_of_two", prefill_urls=(stack.urls["p0"],),
                               decode_urls=(stack.urls["busy"], stack.urls["idle"])))
    for _ in range(6):
        assert stack.post("/v1/completions", json=PROMPT).status_code == 200
    assert (len(stack.fakes["busy"].requests), len(stack.fakes["idle"].requests)) == (0, 6)


def test_cache_aware_keeps_a_prefix_on_one_prefill(stack: Stack) -> None:
    pd(stack, num_prefill=2, config=replace(FAST, prefill_policy="cache_aware"))
    for suffix in ("a", "b", "c", "d"):
        prompt = {**PROMPT, "prompt": "A long shared system prompt. " * 3 + suffix}
        assert stack.post("/v1/completions", json=prompt).status_code == 200
    stack.wait_nothing_in_flight()
    assert sorted(len(stack.fakes[n].requests) for n in ("p0", "p1")) == [0, 4]


def test_retries_on_another_decode_when_it_fails_before_the_first_byte(stack: Stack) -> None:
    pd(stack, num_decode=2)
    stack.fakes["d0"].behavior.fail_status = 503
    stack.fakes["d1"].behavior.fail_status = 503
    stack.fakes["d1"].behavior.num_failures = 0  # d1 is fine
    for _ in range(2):
        response = stack.post("/v1/completions", json={**PROMPT, "stream": True})
        assert response.status_code == 200
        assert response.content == stack.fakes["d1"].sse_bytes()
    assert len(stack.fakes["d0"].requests) >= 1
    stack.wait_nothing_in_flight()
    # D's fake answers without waiting for P's: P may get its copy a moment later.
    p0, d0 = stack.fakes["p0"], stack.fakes["d0"]
    wait_until(lambda: len(p0.requests) == len(d0.requests) + 2, 10.0,
               message=lambda: f"prefill saw {len(p0.requests)}, decode d0 {len(d0.requests)} (+2 expected)")
    assert 'pdserve:router_retries_total{endpoint="/v1/completions"}' in stack.get("/metrics").text


def test_no_retry_once_bytes_reached_the_client(stack: Stack) -> None:
    pd(stack, num_decode=2, num_chunks=4, break_after_chunks=1)
    response = stack.post("/v1/completions", json={**PROMPT, "stream": True})
    assert response.status_code == 200
    events = response.text.split("\n\n")
    assert "[d" in events[0]
    assert "stream broke" in events[1]  # an error event ends the stream
    assert len(stack.fakes["d0"].requests) + len(stack.fakes["d1"].requests) == 1


def test_prefill_error_before_decode_output_is_returned(stack: Stack) -> None:
    pd(stack, delay_s=2.0)
    stack.fakes["p0"].behavior.fail_status = 400
    started = time.monotonic()
    response = stack.post("/v1/completions", json={**PROMPT, "stream": True})
    assert_openai_error(response, 400, "p0 failed on purpose")
    assert time.monotonic() - started < 1.5  # did not wait for the decode side
    assert len(stack.fakes["p0"].requests) == 1  # a 4xx is not retried


def test_prefill_5xx_moves_to_another_prefill(stack: Stack) -> None:
    # Like a real decode instance, D answers only after P's part (here: a short delay).
    pd(stack, num_prefill=2, delay_s=0.3)
    stack.fakes["p0"].behavior.fail_status = 500
    stack.fakes["p1"].behavior.fail_status = 500
    stack.fakes["p1"].behavior.num_failures = 0
    for _ in range(2):
        assert stack.post("/v1/completions", json=PROMPT).status_code == 200
    num_failed = len(stack.fakes["p0"].requests)
    assert num_failed >= 1
    assert len(stack.fakes["p1"].requests) == 2
    # Every D request of a failed pair that reached D was cancelled (the router may
    # also drop one before it is sent, when P fails first); the one D answered names p1.
    d = stack.fakes["d0"]
    wait_until(lambda: d.num_cancelled == len(d.requests) - 2, 5.0,
               message=lambda: f"{d.num_cancelled} of {len(d.requests) - 2} abandoned decode requests cancelled")
    assert len(d.requests) - 2 <= num_failed
    assert stack.fakes["d0"].bodies()[-1]["prefill_instance_id"] == stack.fakes["p1"].instance_id


def test_decode_error_goes_to_the_client_and_retries_are_bounded(stack: Stack) -> None:
    pd(stack, num_decode=3, config=replace(FAST, max_retries=2))
    for name in ("d0", "d1", "d2"):
        stack.fakes[name].behavior.fail_status = 500
    assert_openai_error(stack.post("/v1/completions", json=PROMPT), 500, "failed on purpose")
    assert sum(len(stack.fakes[n].requests) for n in ("d0", "d1", "d2")) == 3
    for name in ("d0", "d1", "d2"):
        stack.fakes[name].behavior.fail_status = 422
    assert_openai_error(stack.post("/v1/completions", json=PROMPT), 422)
    assert sum(len(stack.fakes[n].requests) for n in ("d0", "d1", "d2")) == 4


def test_unreachable_decode_is_retried_elsewhere_and_marked_unhealthy(stack: Stack) -> None:
    # Checks are rare here, so the router still believes in d0 after it went away.
    pd(stack, num_decode=2, config=replace(FAST, health_check_interval_s=60.0))
    stack.servers[1].stop()  # d0
    for _ in range(3):
        assert stack.post("/v1/completions", json=PROMPT).status_code == 200
    workers = {w["url"]: w for w in stack.get("/workers").json()}
    assert workers[stack.urls["d0"]]["healthy"] is False
    assert "unreachable" in workers[stack.urls["d0"]]["last_error"] or workers[
        stack.urls["d0"]]["last_error"].startswith("Connect")
    assert len(stack.fakes["d1"].requests) == 3
    assert len(stack.fakes["d0"].requests) == 0


def test_client_disconnect_closes_the_decode_stream(stack: Stack) -> None:
    pd(stack, num_chunks=200, chunk_delay_s=0.05)
    d = stack.fakes["d0"]
    with stack.http.stream("POST", stack.router.url + "/v1/completions",
                           json={**PROMPT, "stream": True}) as r:
        first = next(r.iter_raw())
        assert b"[d0]" in first
    assert d.stream_aborted.wait(5.0)
    stack.wait_nothing_in_flight()


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_before_the_first_byte_cancels_upstream(stack: Stack, stream: bool) -> None:
    pd(stack, delay_s=5.0)
    stack.fakes["p0"].behavior.delay_s = 5.0
    with pytest.raises(httpx.ReadTimeout):
        stack.http.post(stack.router.url + "/v1/completions", json={**PROMPT, "stream": stream},
                        timeout=0.3)
    # Both sides see their request go away long before their 5 s of work end.
    assert stack.fakes["d0"].cancelled.wait(2.0)
    assert stack.fakes["p0"].cancelled.wait(2.0)
    stack.wait_nothing_in_flight(1.0)


def test_health_needs_a_healthy_prefill_and_decode(stack: Stack) -> None:
    stack.fake("prefill", "p0")
    stack.fake("decode", "d0", healthy=False)
    stack.start_router(replace(FAST, prefill_urls=(stack.urls["p0"],),
                               decode_urls=(stack.urls["d0"],)), wait_healthy=False)
    assert_openai_error(stack.get("/health"), 503, "decode")
    assert_openai_error(stack.post("/v1/completions", json=PROMPT), 503, "decode")
    stack.fakes["d0"].behavior.healthy = True
    stack.wait_health(200)
    stack.fakes["p0"].behavior.healthy = False
    stack.wait_health(503)


def test_health_generate_needs_a_pair_that_generates(stack: Stack) -> None:
    stack.fake("prefill", "p0")
    stack.fake("decode", "d0", fail_status=500)
    stack.start_router(replace(FAST, prefill_urls=(stack.urls["p0"],), decode_urls=(stack.urls["d0"],)))
    assert_openai_error(stack.get("/health_generate"), 503, "generation check failed")
    stack.fakes["d0"].behavior.fail_status = None
    response = stack.get("/health_generate")
    assert response.status_code == 200 and response.json() == {"status": "ok", "mode": "pd"}
    assert any("bootstrap_room" in body for body in stack.fakes["d0"].bodies())


def test_colocated_mode_forwards_without_pd_fields(stack: Stack) -> None:
    stack.fake("null", "c0")
    stack.fake("null", "c1")
    stack.start_router(replace(FAST, mode="colocated",
                               worker_urls=(stack.urls["c0"], stack.urls["c1"])))
    for _ in range(2):
        assert stack.post("/generate", json={"text": "hi", "sampling_params": {}}).status_code == 200
    assert stack.fakes["c0"].bodies() == stack.fakes["c1"].bodies() == [
        {"text": "hi", "sampling_params": {}}]
    stack.fakes["c0"].behavior.healthy = stack.fakes["c1"].behavior.healthy = False
    stack.wait_health(503)


def test_workers_models_server_info_flush_and_metrics(stack: Stack) -> None:
    pd(stack)
    p, d = stack.fakes["p0"], stack.fakes["d0"]
    listed = stack.get("/workers").json()
    assert [(w["role"], w["url"], w["instance_id"], w["healthy"]) for w in listed] == [
        ("decode", stack.urls["d0"], d.instance_id, True),
        ("prefill", stack.urls["p0"], p.instance_id, True)]
    assert stack.get("/v1/models").json()["data"][0]["id"] == "fake-model"
    info = stack.get("/get_server_info").json()
    assert {i["server_info"]["instance_id"] for i in info["instances"]} == {p.instance_id,
                                                                           d.instance_id}
    assert stack.post("/flush_cache").status_code == 200
    assert p.bodies("/flush_cache") == d.bodies("/flush_cache") == [None]
    assert stack.get("/flush_cache").status_code == 200  # GET too, as an instance takes it
    assert len(p.bodies("/flush_cache")) == len(d.bodies("/flush_cache")) == 2
    assert stack.get("/v1/models/fake-model").json()["id"] == "fake-model"
    assert_openai_error(stack.get("/v1/models/other"), 404)
    # An id is looked up, not pasted into a worker's path (with the router's key).
    assert_openai_error(stack.get("/v1/models/..%2F..%2Fflush_cache"), 404)
    assert len(p.bodies("/flush_cache")) == 2
    stack.post("/v1/completions", json=PROMPT)
    metrics = stack.get("/metrics").text
    assert 'pdserve:router_requests_total{endpoint="/v1/completions"} 1.0' in metrics
    assert f'pdserve:router_worker_in_flight{{role="decode",url="{stack.urls["d0"]}"}} 0.0' in metrics


def test_api_key_guards_everything_but_health(stack: Stack) -> None:
    pd(stack, config=replace(FAST, api_key="sekret"))
    assert stack.get("/health").status_code == 200
    refused = stack.post("/v1/completions", json=PROMPT)
    assert_openai_error(refused, 401, "API key")
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert_openai_error(stack.get("/workers", headers={"Authorization": "Bearer wrong"}), 401)
    assert stack.get("/workers").headers["WWW-Authenticate"] == "Bearer"
    assert_openai_error(stack.get("/metrics"), 401)
    # As on an instance: the schema and the docs want the key too.
    for path in ("/openapi.json", "/docs", "/v1/models/fake-model"):
        assert_openai_error(stack.get(path), 401)
    assert stack.get("/openapi.json", headers={"Authorization": "Bearer sekret"}).status_code == 200
    ok = stack.post("/v1/completions", json=PROMPT, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200
    assert len(stack.fakes["d0"].requests) == 1


def _keyed_pd(stack: Stack, worker_key: str, config: RouterConfig) -> None:
    """One prefill and one decode that want ``worker_key``, and a router (not waited for)."""
    for role, name in (("prefill", "p0"), ("decode", "d0")):
        stack.fake(role, name, api_key=worker_key)
    stack.start_router(replace(config, prefill_urls=(stack.urls["p0"],), decode_urls=(stack.urls["d0"],)),
                       wait_healthy=False)


@pytest.mark.parametrize(("router_key", "worker_key"), [("sekret", None), ("sekret", "wk"), (None, "wk")])
def test_router_presents_the_worker_key_to_keyed_workers(stack: Stack, router_key: str | None,
                                                         worker_key: str | None) -> None:
    key = worker_key or router_key  # --worker-api-key defaults to --api-key
    _keyed_pd(stack, key, replace(FAST, api_key=router_key, worker_api_key=worker_key))
    stack.wait_health(200)
    client = {"Authorization": f"Bearer {router_key}"} if router_key else {}
    ok = stack.post("/v1/completions", json=PROMPT, headers=client)
    assert ok.status_code == 200, ok.text
    streamed = stack.post("/v1/completions", json={**PROMPT, "stream": True}, headers=client)
    assert streamed.content == stack.fakes["d0"].sse_bytes()
    # D's fake answers without waiting for P's: P may get its copy a moment later.
    wait_until(lambda: len(stack.fakes["p0"].bodies("/v1/completions")) == 2, 10.0)
    assert stack.get("/v1/models", headers=client).json()["data"][0]["id"] == "fake-model"
    info = stack.get("/get_server_info", headers=client).json()
    assert all(i["server_info"] is not None for i in info["instances"])
    assert stack.post("/flush_cache", headers=client).status_code == 200


def test_a_worker_that_refuses_the_routers_key_is_unhealthy(stack: Stack) -> None:
    # /health is open on a keyed instance: only /get_server_info shows the refusal.
    _keyed_pd(stack, "right", replace(FAST, worker_api_key="wrong"))
    wait_until(lambda: all("401" in (w["last_error"] or "") for w in stack.get("/workers").json()),
               message=lambda: f"workers: {stack.get('/workers').json()}")
    assert not any(w["healthy"] for w in stack.get("/workers").json())
    assert stack.get("/health").status_code == 503
    assert_openai_error(stack.post("/v1/completions", json=PROMPT), 503)
    assert stack.fakes["d0"].requests == []
    stack.fakes["p0"].behavior.api_key = stack.fakes["d0"].behavior.api_key = "wrong"
    stack.wait_health(200)  # the same workers, now taking the router's key


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_router_key_scheme_is_case_insensitive(stack: Stack, scheme: str) -> None:
    pd(stack, config=replace(FAST, api_key="sekret"))
    assert stack.get("/workers", headers={"Authorization": f"{scheme} sekret"}).status_code == 200
    for header in (f"{scheme}sekret", "Basic sekret", "Bearer sekret2", "Bearer s\u00e9kret".encode()):
        assert_openai_error(stack.get("/workers", headers={"Authorization": header}), 401,
                            code="invalid_api_key")


@pytest.mark.parametrize("open_metrics", [False, True])
def test_metrics_without_the_key_only_when_the_operator_says(stack: Stack, open_metrics: bool) -> None:
    pd(stack, config=replace(FAST, api_key="sekret", open_metrics=open_metrics))
    assert stack.get("/health").status_code == 200
    metrics = stack.get("/metrics")
    if open_metrics:
        assert metrics.status_code == 200 and "pdserve:router_requests_total" in metrics.text
    else:
        assert_openai_error(metrics, 401)
    assert_openai_error(stack.get("/workers"), 401)  # everything else still wants it


def _refused_discoveries(caplog: pytest.LogCaptureFixture) -> int:
    """Discovery rounds whose instance list the bootstrap service refused (401)."""
    return sum("cannot list instances" in m and "401" in m for m in (r.getMessage() for r in list(caplog.records)))


def test_router_discovers_with_the_cluster_secret(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    bootstrap = ServerThread(create_bootstrap_app(BootstrapConfig(ttl_s=30.0, cluster_secret="cs"))).start()
    stack.servers.append(bootstrap)
    p, d = stack.fake("prefill", "p0"), stack.fake("decode", "d0")
    with BootstrapClient(bootstrap.url, secret="cs") as client:
        for worker, name in ((p, "p0"), (d, "d0")):
            client.register(make_info(worker.instance_id, worker.role, http_url=stack.urls[name]))
        with BootstrapClient(bootstrap.url) as stranger:
            with pytest.raises(BootstrapError, match="401"):
                stranger.register(make_info("evil", "prefill", http_url="http://10.6.6.6:1"))
        # Without the secret the router sees nobody; with it, both.
        with caplog.at_level(logging.WARNING, logger="pdserve.router.workers"):
            stack.start_router(replace(FAST, bootstrap_url=bootstrap.url), wait_healthy=False)
            # A few discovery rounds, each refused, that must find nobody.
            wait_until(lambda: _refused_discoveries(caplog) >= 3, 10.0,
                       message="the router never asked the bootstrap service")
        assert stack.get("/workers").json() == []
        stack.start_router(replace(FAST, bootstrap_url=bootstrap.url, cluster_secret="cs"))
        assert {w["instance_id"] for w in stack.get("/workers").json()} == {p.instance_id, d.instance_id}
        assert stack.post("/v1/completions", json=PROMPT).status_code == 200


@pytest.mark.parametrize(("content", "fragment"),
                         [(b"{oops", "not valid JSON"), (b'["a"]', "JSON object"), (b"", "JSON")])
def test_bad_input_is_400_without_contacting_workers(stack: Stack, content: bytes,
                                                     fragment: str) -> None:
    pd(stack)
    response = stack.post("/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 400, fragment)
    assert stack.fakes["p0"].requests == stack.fakes["d0"].requests == []


def test_flush_cache_refused_by_a_busy_worker_is_a_400_naming_it(stack: Stack) -> None:
    pd(stack)
    stack.fakes["d0"].behavior.busy = True
    response = stack.post("/flush_cache")
    assert_openai_error(response, 400, "retry when no requests are running")
    assert stack.urls["d0"] in response.json()["error"]["message"]
    assert "flushed on 1 of 2" in response.json()["error"]["message"]  # the prefill did flush
    stack.fakes["d0"].behavior.busy = False
    assert stack.post("/flush_cache").status_code == 200


def test_a_compressed_body_is_415_without_contacting_workers(stack: Stack) -> None:
    pd(stack)
    response = stack.post("/v1/completions", content=gzip.compress(json.dumps(PROMPT).encode()),
                          headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert_openai_error(response, 415, "uncompressed")
    assert stack.fakes["p0"].requests == stack.fakes["d0"].requests == []


def test_no_workers_at_all_is_503(stack: Stack) -> None:
    stack.start_router(FAST, wait_healthy=False)
    assert_openai_error(stack.post("/v1/completions", json=PROMPT), 503, "no healthy")
    assert_openai_error(stack.get("/v1/models"), 503)


def test_router_discovers_and_forgets_instances(stack: Stack) -> None:
    bootstrap = ServerThread(create_bootstrap_app(BootstrapConfig(ttl_s=30.0))).start()
    stack.servers.append(bootstrap)
    p, d, c = stack.fake("prefill", "p0"), stack.fake("decode", "d0"), stack.fake("null", "c0")
    with BootstrapClient(bootstrap.url) as client:
        for worker, name in ((p, "p0"), (d, "d0"), (c, "c0")):
            client.register(make_info(worker.instance_id, worker.role, http_url=stack.urls[name]))
        stack.start_router(replace(FAST, bootstrap_url=bootstrap.url))
        listed = {(w["role"], w["url"], w["instance_id"], w["source"])
                  for w in stack.get("/workers").json()}
        # The colocated instance is not a PD worker.
        assert listed == {("prefill", stack.urls["p0"], p.instance_id, "bootstrap"),
                          ("decode", stack.urls["d0"], d.instance_id, "bootstrap")}
        assert stack.post("/v1/completions", json=PROMPT).status_code == 200
        assert d.bodies()[0]["prefill_instance_id"] == p.instance_id
        client.deregister(d.instance_id)
        stack.wait_health(503)
        assert [w["role"] for w in stack.get("/workers").json()] == ["prefill"]


def test_cli_flags_build_the_config() -> None:
    config = parse_args(["--prefill", "http://p:1", "--decode", "http://d:1", "http://d:2",
                         "--decode", "http://d:3", "--policy", "power_of_two",
                         "--prefill-policy", "cache_aware", "--api-key", "k", "--max-retries", "0"])
    assert config.mode == "pd"
    assert config.decode_urls == ("http://d:1", "http://d:2", "http://d:3")
    assert (config.resolved_prefill_policy, config.resolved_decode_policy) == (
        "cache_aware", "power_of_two")
    assert (config.api_key, config.max_retries) == ("k", 0)
    assert parse_args(["--worker", "http://w:1"]).mode == "colocated"
    assert parse_args([]) == replace(RouterConfig())
    with pytest.raises(SystemExit):
        parse_args(["--worker", "http://w:1", "--prefill", "http://p:1"])


def test_router_reads_keys_and_secret_from_flags_file_or_environment(tmp_path, monkeypatch) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    config = parse_args(["--api-key", "k1", "--cluster-secret-file", str(path)])
    assert (config.api_key, config.resolved_worker_api_key, config.cluster_secret) == ("k1", "k1", "from-file")
    assert parse_args(["--api-key", "k1", "--worker-api-key", "w"]).resolved_worker_api_key == "w"
    assert "k1" not in repr(config) and "from-file" not in repr(config)
    monkeypatch.setenv("PDSERVE_API_KEY", "k2")
    monkeypatch.setenv("PDSERVE_CLUSTER_SECRET", "s2")
    config = parse_args([])
    assert (config.api_key, config.cluster_secret) == ("k2", "s2")
    with pytest.raises(SystemExit):
        parse_args(["--cluster-secret-file", str(tmp_path / "missing")])
