"""Metrics, the request journey and log lines of a live PD cluster (real processes).

One cluster (bootstrap + router + prefill + decode over NIXL on DRAM) serves
every test: its scrapes are parsed with prometheus_client's own parser, the
counters are checked against what clients were told (``usage``) and against
the KV layout, and a request's journey (``timing``) against the latency the
client measured.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pdserve.launcher import Cluster
from pdserve.tests.support.clusters import local_cluster_config
from pdserve.tests.support.health import wait_healthy
from pdserve.tests.support.payloads import prompt_ids, sse_events
from pdserve.tests.support.ports import free_port
from prometheus_client.parser import text_string_to_metric_families

PAGE_SIZE = 4
TRANSFER_BUCKETS = ("0.25", "1.0", "4.0")
SERVE_ARGS = ("--page-size", str(PAGE_SIZE), "--chunked-prefill-size", "16", "--max-total-tokens", "4096",
              "--skip-server-warmup", "--enable-metrics", "--bucket-kv-transfer-latency", *TRANSFER_BUCKETS)
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "pdserve.json"
JOURNEY = ("router_queue_and_pick", "front", "decode_wait_pages", "prefill_bootstrap", "prefill_queue",
           "prefill", "kv_transfer", "decode_queue", "decode")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    cfg = local_cluster_config(tmp_path_factory.mktemp("obs"), transfer_backend="nixl", startup_timeout_s=180,
                               serve_args=SERVE_ARGS)
    with Cluster(cfg) as c:
        yield c


def _get(url: str) -> httpx.Response:
    resp = httpx.get(url, timeout=30, trust_env=False)
    assert resp.status_code == 200, resp.text
    return resp


def scrape(url: str) -> dict[str, tuple[str, dict]]:
    """family name -> (type, {(sample name, labels as a sorted tuple): value})."""
    out = {}
    for family in text_string_to_metric_families(_get(f"{url}/metrics").text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        out[family.name] = (family.type, samples)
    return out


def total(families: dict, sample: str, **labels: str) -> float:
    """Sum of a sample over every label set that contains ``labels``."""
    family = re.sub(r"_(total|bucket|count|sum)$", "", sample)
    _, samples = families.get(family, ("", {}))
    return sum(v for (name, ls), v in samples.items() if name == sample and labels.items() <= dict(ls).items())


def _urls(cluster: Cluster) -> dict[str, str]:
    return {"router": cluster.router_url, "prefill": cluster.instance_urls("prefill")[0],
            "decode": cluster.instance_urls("decode")[0]}


def _scrape_all(cluster: Cluster) -> dict[str, dict]:
    return {role: scrape(url) for role, url in _urls(cluster).items()}


EXPECTED_TYPES = {
    "prefill": {
        "pdserve:kv_transfer_latency_seconds": "histogram", "pdserve:kv_transfer_bytes": "counter",
        "pdserve:kv_transfer_speed_gb_s": "gauge", "pdserve:kv_transfer_failures": "counter",
        "pdserve:kv_transfers": "counter", "pdserve:num_bootstrap_failed_reqs": "counter",
        "pdserve:kv_transfer_num_descriptors": "histogram",
        "pdserve:num_prefill_bootstrap_queue_reqs": "gauge", "pdserve:num_prefill_inflight_queue_reqs": "gauge",
        "pdserve:per_stage_req_latency_seconds": "histogram", "pdserve:num_requests": "counter",
        "pdserve:time_to_first_token_seconds": "histogram",
    },
    "decode": {
        "pdserve:kv_transfer_bytes": "counter", "pdserve:kv_transfer_failures": "counter",
        "pdserve:num_bootstrap_failed_reqs": "counter", "pdserve:num_decode_prealloc_queue_reqs": "gauge",
        "pdserve:num_decode_transfer_queue_reqs": "gauge", "pdserve:num_decode_quarantined_rooms": "gauge",
        "pdserve:per_stage_req_latency_seconds": "histogram", "pdserve:e2e_request_latency_seconds": "histogram",
        "pdserve:prompt_tokens": "counter", "pdserve:generation_tokens": "counter",
    },
    "router": {
        "pdserve:router_requests": "counter", "pdserve:router_retries": "counter",
        "pdserve:router_request_errors": "counter", "pdserve:router_request_latency_seconds": "histogram",
        "pdserve:router_worker_requests": "counter", "pdserve:router_worker_errors": "counter",
        "pdserve:router_worker_request_latency_seconds": "histogram", "pdserve:router_worker_in_flight": "gauge",
        "pdserve:per_stage_req_latency_seconds": "histogram",
    },
}


def test_scrape_has_every_name_with_its_type(cluster: Cluster) -> None:
    scrapes = _scrape_all(cluster)
    for role, expected in EXPECTED_TYPES.items():
        found = {name: scrapes[role][name][0] for name in expected if name in scrapes[role]}
        assert found == expected, f"{role}: {sorted(set(expected) - set(found))} missing or mistyped"
    # --bucket-kv-transfer-latency reached the prefill engine's histogram.
    bounds = {dict(ls)["le"] for (name, ls) in scrapes["prefill"]["pdserve:kv_transfer_latency_seconds"][1]
              if name.endswith("_bucket")}
    assert bounds == {*TRANSFER_BUCKETS, "+Inf"}


def _completion(router: str, ids: list[int], max_tokens: int, stream: bool, **extra: object) -> dict:
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    resp = httpx.post(f"{router}/v1/completions", json=body, timeout=120, trust_env=False)
    assert resp.status_code == 200, resp.text
    if not stream:
        return resp.json()
    events = sse_events(resp)
    return events[-1]  # the usage chunk, last


def test_counters_agree_with_what_clients_saw(cluster: Cluster) -> None:
    urls = _urls(cluster)
    bytes_per_page = _get(f"{urls['decode']}/get_server_info").json()["kv_pool"]["bytes_per_page"]
    assert bytes_per_page == _get(f"{urls['prefill']}/get_server_info").json()["kv_pool"]["bytes_per_page"]
    before = _scrape_all(cluster)
    lengths = (3, 4, 9, 17, 40, 40)  # the repeat hits P's prefix cache: its pages still move
    usages = []
    for i, n in enumerate(lengths):
        ids = prompt_ids(n, seed=100 + (i if i < 5 else 4))
        usages.append(_completion(urls["router"], ids, max_tokens=3 + i, stream=i % 2 == 1)["usage"])
    after = _scrape_all(cluster)

    def moved(where: str, sample: str, **labels: str) -> float:
        return total(after[where], sample, **labels) - total(before[where], sample, **labels)

    num = len(lengths)
    assert [u["prompt_tokens"] for u in usages] == list(lengths)
    assert moved("router", "pdserve:router_requests_total", endpoint="/v1/completions") == num
    assert moved("router", "pdserve:router_worker_requests_total", role="prefill") == num
    assert moved("router", "pdserve:router_worker_requests_total", role="decode") == num
    assert moved("router", "pdserve:router_request_latency_seconds_count") == num
    assert moved("decode", "pdserve:num_requests_total") == num
    assert moved("prefill", "pdserve:num_requests_total") == num
    assert moved("decode", "pdserve:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert moved("decode", "pdserve:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    kv_bytes = sum(-(-n // PAGE_SIZE) for n in lengths) * bytes_per_page
    for role in ("prefill", "decode"):
        assert moved(role, "pdserve:kv_transfers_total") == num, role
        assert moved(role, "pdserve:kv_transfer_bytes_total") == kv_bytes, role
        assert moved(role, "pdserve:kv_transfer_failures_total") == 0, role
    assert moved("prefill", "pdserve:kv_transfer_latency_seconds_count") == num
    assert moved("prefill", "pdserve:kv_transfer_num_descriptors_count") == num
    assert total(after["prefill"], "pdserve:kv_transfer_speed_gb_s") > 0
    # Each request's journey went into the histograms of the instance that measured it.
    assert moved("router", "pdserve:per_stage_req_latency_seconds_count", stage="router_queue_and_pick") == num
    assert moved("prefill", "pdserve:per_stage_req_latency_seconds_count", stage="prefill") == num
    for stage in ("front", "decode_wait_pages", "kv_transfer", "decode"):
        assert moved("decode", "pdserve:per_stage_req_latency_seconds_count", stage=stage) == num, stage
    assert moved("decode", "pdserve:per_stage_req_latency_seconds_count", stage="prefill") == 0


def _instance_ids(cluster: Cluster) -> dict[str, str]:
    workers = _get(f"{cluster.router_url}/workers").json()
    return {w["role"]: w["instance_id"] for w in workers}


def _check_journey(timing: dict, ids: dict[str, str]) -> None:
    phases = timing["phases_s"]
    assert tuple(phases) == JOURNEY, phases
    assert all(v >= 0 for v in phases.values()), phases
    assert timing["instance_id"] == ids["decode"] and timing["prefill_instance_id"] == ids["prefill"]
    assert timing["total_s"] == pytest.approx(sum(phases.values()))


def _timed(http: httpx.Client, url: str, body: dict, headers: dict | None = None) -> tuple[float, dict]:
    """(client-measured seconds, parsed answer: the JSON body, or a stream's last event)."""
    start = time.monotonic()
    resp = http.post(url, json=body, headers=headers or {})
    client_s = time.monotonic() - start
    assert resp.status_code == 200, resp.text
    return client_s, (sse_events(resp)[-1] if body.get("stream") else resp.json())


# Unmeasured per request: the client's own send and receive, and the loopback
# hops between processes (a few ms on a loaded 2-core host); a request of
# ~50 ms (the colocated one) would otherwise spend a fixed cost against 10%.
UNMEASURED_S = 0.01


def assert_sums_to_client_latency(samples: list[tuple[float, dict]]) -> None:
    """The phases add up to what the client measured within 10% past the
    unmeasured hops (the median of the samples: one request can lose tens of
    ms to a loaded host's scheduler outside any process's view)."""
    gaps = sorted(max(abs(t["total_s"] - client_s) - UNMEASURED_S, 0.0) / client_s for client_s, t in samples)
    assert gaps[len(gaps) // 2] <= 0.1, [(client_s, t["phases_s"]) for client_s, t in samples]


def test_journey_of_one_request_sums_to_client_latency(cluster: Cluster) -> None:
    ids = _instance_ids(cluster)
    prompt = prompt_ids(40, seed=7)
    url = f"{cluster.router_url}/v1/completions"
    with httpx.Client(timeout=120, trust_env=False) as http:
        for stream in (False, True):
            body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": stream,
                    "return_timing": True}
            samples = [_timed(http, url, body) for _ in range(3)]
            samples = [(client_s, out["timing"]) for client_s, out in samples]
            for _, timing in samples:
                _check_journey(timing, ids)
            assert_sums_to_client_latency(samples)
        # The header asks for it too; /generate carries it in meta_info.
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True}}
        samples = [_timed(http, f"{cluster.router_url}/generate", body, {"X-PDServe-Timing": "1"}) for _ in range(3)]
        samples = [(client_s, out["meta_info"]["timing"]) for client_s, out in samples]
        for _, timing in samples:
            _check_journey(timing, ids)
        assert_sums_to_client_latency(samples)


def test_streamed_journey_is_on_the_last_chunk_only(cluster: Cluster) -> None:
    body = {"prompt": "a b c d", "max_tokens": 4, "stream": True, "return_timing": True}
    resp = httpx.post(f"{cluster.router_url}/v1/completions", json=body, timeout=120, trust_env=False)
    events = sse_events(resp)
    assert [("timing" in e) for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["choices"] == []
    plain = httpx.post(f"{cluster.router_url}/v1/completions", json={**body, "stream": False, "return_timing": False},
                       timeout=120, trust_env=False).json()
    assert "timing" not in plain


def test_logs_show_transfer_batches_and_rooms_waiting(cluster: Cluster) -> None:
    _completion(cluster.router_url, prompt_ids(20, seed=3), max_tokens=2, stream=False)
    logs = {c.name: c.log_path.read_text(errors="replace") for c in cluster.children}
    assert re.search(r"KV transfer batch\. #room: \d+, #page: \d+, #byte: \d+, #descriptor: \d+", logs["prefill-0"])
    assert re.search(r"Decode rooms waiting for KV\. #new-room: \d+, #transfer-req: \d+", logs["decode-0"])
    assert "Prefill batch." in logs["prefill-0"]
    assert "Traceback" not in logs["prefill-0"] + logs["decode-0"] + logs["router"]


def dashboard_metrics(dashboard: dict) -> set[str]:
    """Every pdserve metric name the dashboard's queries mention."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return {m for e in exprs for m in re.findall(r"pdserve:[A-Za-z0-9_:]+", e)}


def test_grafana_dashboard_queries_only_live_metrics(cluster: Cluster) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = dashboard_metrics(dashboard)
    assert len(names) >= 20
    live: dict[str, str] = {}
    for families in _scrape_all(cluster).values():
        live.update({name: kind for name, (kind, _) in families.items()})
    problems = []
    for name in sorted(names):
        base, suffix = re.match(r"(.*?)(_bucket|_count|_sum|_total)?$", name).groups()
        kind = live.get(base)
        wanted = {"_bucket": "histogram", "_count": "histogram", "_sum": "histogram", "_total": "counter"}.get(suffix)
        if kind is None or (wanted and kind != wanted) or (not suffix and kind not in ("gauge",)):
            problems.append(f"{name}: live type {kind}")
    assert problems == []


def test_bench_timing_collects_and_draws_the_phases(cluster: Cluster, tmp_path: Path, capsys) -> None:
    import asyncio

    from pdserve.benchmarks import bench_serving

    out_json, png = tmp_path / "bench.json", tmp_path / "timing.png"
    cfg = bench_serving.config_from_argv([
        "--base-url", cluster.router_url, "--dataset", "random-ids", "--num-prompts", "4",
        "--random-input-len", "24", "--random-output-len", "6", "--ignore-eos", "--disable-tqdm",
        "--max-concurrency", "2", "--timing", "--timing-plot", str(png), "--output-json", str(out_json)])
    outcome = asyncio.run(bench_serving.run_benchmark(cfg))
    records = [r for result in outcome.results for r in result.records]
    assert all(r.success and tuple(r.phases_s) == JOURNEY for r in records), records
    bench_serving.write_report(cfg, outcome)
    printed = capsys.readouterr().out
    assert "mean ms per phase" in printed and "A=router_queue_and_pick" in printed
    journeys = json.loads(out_json.read_text())["timing"]
    assert journeys[0]["num_requests"] == 4 and list(journeys[0]["mean_phases_ms"]) == list(JOURNEY)
    assert png.stat().st_size > 1000


def test_colocated_journey_and_its_stage_histogram(main_server) -> None:
    before = scrape(main_server.url)
    body = {"messages": [{"role": "user", "content": "Count the pages of a book."}], "max_tokens": 32,
            "ignore_eos": True, "temperature": 0, "return_timing": True}
    with httpx.Client(timeout=120, trust_env=False) as http:
        samples = [_timed(http, f"{main_server.url}/v1/chat/completions", body) for _ in range(3)]
    samples = [(client_s, out["timing"]) for client_s, out in samples]
    for _, timing in samples:
        assert tuple(timing["phases_s"]) == ("front", "prefill_queue", "prefill", "decode")
        assert timing["prefill_instance_id"] is None and timing["instance_id"].startswith("null-")
    assert_sums_to_client_latency(samples)
    after = scrape(main_server.url)
    for stage in samples[0][1]["phases_s"]:
        key = "pdserve:per_stage_req_latency_seconds_count"
        assert total(after, key, stage=stage) - total(before, key, stage=stage) == len(samples), stage


def test_a_room_whose_prefill_instance_is_unknown_counts_as_a_bootstrap_failure(cluster: Cluster) -> None:
    decode = _urls(cluster)["decode"]
    before = scrape(decode)
    body = {"input_ids": prompt_ids(8, seed=5), "sampling_params": {"max_new_tokens": 2},
            "bootstrap_room": 12345, "prefill_instance_id": "prefill-nobody"}
    resp = httpx.post(f"{decode}/generate", json=body, timeout=60, trust_env=False)
    assert resp.status_code >= 500 and "not registered" in resp.json()["error"]["message"]
    after = scrape(decode)
    key = "pdserve:num_bootstrap_failed_reqs_total"
    assert total(after, key) - total(before, key) == 1
    assert total(after, "pdserve:kv_transfer_failures_total") == total(before, "pdserve:kv_transfer_failures_total")


def _in_process_front(mode: str, bootstrap_url: str, exporter) -> tuple:
    """A real front in a thread of this process (its engine a child process), tracing into ``exporter``."""
    from pdserve.serve import engine_main, parse_config, resolve_model_dir
    from pdserve.server.app import build_app
    from pdserve.server.engine_client import EngineClient
    from pdserve.server.metrics import ServerMetrics
    from pdserve.server.state import AppState
    from pdserve.server.tokenizer import load_tokenizer
    from pdserve.tests.support.server_thread import ServerThread
    from pdserve.web.event_stream import with_raw_send
    from pdserve.web.tracing import Tracer

    port = free_port()
    cfg = parse_config(["--port", str(port), "--disaggregation-mode", mode, "--disaggregation-bootstrap-url",
                        bootstrap_url, "--page-size", str(PAGE_SIZE), "--max-total-tokens", "2048",
                        "--skip-server-warmup"])
    model_dir = resolve_model_dir(cfg.model_path)
    tokenizer = load_tokenizer(model_dir, None)
    state = AppState(cfg, model_dir, "tiny", tokenizer, EngineClient(cfg, model_dir, engine_main, len(tokenizer)),
                     ServerMetrics(False, "tiny"), tracer=Tracer(f"pdserve-{mode}", exporter=exporter))
    return ServerThread(with_raw_send(build_app(state)), port=port).start(), state


def test_spans_link_router_prefill_and_decode(cluster: Cluster) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from pdserve.router.app import create_app
    from pdserve.router.config import RouterConfig
    from pdserve.tests.support.server_thread import ServerThread
    from pdserve.tests.support.waiting import wait_until
    from pdserve.web.tracing import Tracer

    exporter = InMemorySpanExporter()
    threads = []
    try:
        for mode in ("prefill", "decode"):
            thread, _ = _in_process_front(mode, cluster.bootstrap_url, exporter)
            threads.append(thread)
        for thread in threads:
            wait_healthy(thread.url, 180.0)
        config = RouterConfig(prefill_urls=(threads[0].url,), decode_urls=(threads[1].url,), policy="round_robin")
        from pdserve.web.event_stream import with_raw_send

        router = ServerThread(with_raw_send(create_app(config, tracer=Tracer("pdserve-router", exporter=exporter))))
        threads.append(router.start())
        wait_healthy(router.url, 180.0)
        client_trace = "0af7651916cd43dd8448eb211c80319c"
        headers = {"traceparent": f"00-{client_trace}-b7ad6b7169203331-01"}
        body = {"prompt": prompt_ids(21, seed=9), "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        resp = httpx.post(f"{router.url}/v1/completions", json=body, headers=headers, timeout=120, trust_env=False)
        assert resp.status_code == 200, resp.text

        def spans() -> dict[str, list]:
            found: dict[str, list] = {}
            for span in exporter.get_finished_spans():
                found.setdefault(span.name, []).append(span)
            return found

        tops = ("pdserve.router", "pdserve.prefill", "pdserve.decode")
        wait_until(lambda: all(name in spans() for name in tops), 30, 0.1, lambda: f"spans: {sorted(spans())}")
        found = spans()
        router_span, p_span, d_span = (found[name][0] for name in tops)
        assert {s.context.trace_id for s in (router_span, p_span, d_span)} == {int(client_trace, 16)}
        assert p_span.parent.span_id == d_span.parent.span_id == router_span.context.span_id
        assert router_span.resource.attributes["service.name"] == "pdserve-router"
        assert d_span.resource.attributes["service.name"] == "pdserve-decode"

        def children(parent) -> list[str]:
            kids = [s for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == parent.context.span_id]
            return [s.name for s in sorted(kids, key=lambda s: s.start_time)]

        first, *calls = children(router_span)  # its own phase, then its calls to P and D
        assert first == "router_queue_and_pick" and sorted(calls) == ["pdserve.decode", "pdserve.prefill"]
        assert children(p_span) == ["prefill_queue", "prefill", "kv_transfer"]
        assert children(d_span) == ["decode_wait_pages", "prefill_bootstrap", "prefill_queue", "prefill",
                                    "kv_transfer", "decode_queue", "decode"]
        assert d_span.start_time <= d_span.end_time <= router_span.end_time + 50_000_000
    finally:
        for thread in reversed(threads):
            thread.stop(timeout_s=15)


def test_timing_input_mistakes_are_400s_or_ignored(cluster: Cluster) -> None:
    decode = _urls(cluster)["decode"]  # a decode instance prefills a request without a room itself
    body = {"prompt": "a b", "max_tokens": 2, "return_timing": True}
    for value in ("nan", "inf", "-1", "soon"):
        resp = httpx.post(f"{decode}/v1/completions", json=body, headers={"X-PDServe-Router-S": value},
                          timeout=60, trust_env=False)
        assert resp.status_code == 200, resp.text
        assert tuple(resp.json()["timing"]["phases_s"]) == ("front", "prefill_queue", "prefill", "decode")
    resp = httpx.post(f"{cluster.router_url}/v1/completions", json={**body, "return_timing": "yes"},
                      timeout=60, trust_env=False)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "return_timing", resp.text


def test_no_log_has_a_traceback_after_all_of_the_above(cluster: Cluster) -> None:
    # Last in this module: the client mistakes and the failed room above were answered, not crashed on.
    for child in cluster.children:
        assert "Traceback" not in child.log_path.read_text(errors="replace"), child.name
