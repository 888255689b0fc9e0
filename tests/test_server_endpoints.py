"""Operational endpoints: health, model and server info, cache flush, metrics, model list."""

from __future__ import annotations

import re

from pdserve.tests.support.openai_errors import assert_openai_error
from pdserve.tests.support.payloads import generate_body, prompt_ids
from pdserve.tests.support.server_process import ServerProcess


def test_health(main_server: ServerProcess) -> None:
    response = main_server.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "role": "null"}
    # The front listens before the engine has loaded; meanwhile /health said 503.
    assert main_server.not_ready_status == 503
    assert_openai_error(main_server.not_ready_body, 503, code=503)


def test_health_generate(main_server: ServerProcess) -> None:
    before = main_server.server_info()["num_generated_tokens"]
    response = main_server.get("/health_generate")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert main_server.server_info()["num_generated_tokens"] > before  # it really generated


def test_get_model_info(main_server: ServerProcess, model_dir: str) -> None:
    info = main_server.get("/get_model_info").json()
    assert info["model_path"] == model_dir
    assert info["tokenizer_path"] == model_dir
    assert info["served_model_name"] == "tiny"
    assert info["is_generation"] is True


def test_get_server_info(main_server: ServerProcess) -> None:
    info = main_server.server_info()
    assert info["pid"] > 0 and info["pid"] != main_server.proc.pid  # the engine process
    assert info["num_running_reqs"] == 0 and info["num_queued_reqs"] == 0
    # The effective configuration: every flag, with what start-up resolved.
    assert (info["role"], info["ready"], info["page_size"], info["max_total_tokens"]) == ("null", True, 4, 8192)
    assert info["context_len"] == 2048
    pool = info["kv_pool"]
    assert pool["page_size"] == 4 and pool["total_pages"] == 8192 // 4
    assert pool["used_pages"] == 0
    assert pool["free_pages"] + pool["cached_pages"] == pool["total_pages"]
    assert info["chunked_prefill_size"] == 16 and info["disaggregation_mode"] == "null"
    assert info["context_len"] == 2048 and info["vocab_size"] == 1000


def test_flush_cache(main_server: ServerProcess) -> None:
    assert main_server.post("/generate", generate_body(prompt_ids(30, seed=5), 2)).status_code == 200
    assert main_server.server_info()["kv_pool"]["cached_pages"] > 0
    resp = main_server.post("/flush_cache", {})
    assert resp.status_code == 200
    pool = main_server.server_info()["kv_pool"]
    assert pool["cached_pages"] == 0 and pool["free_pages"] == pool["total_pages"]
    again = main_server.post("/generate", generate_body(prompt_ids(30, seed=5), 2))
    assert again.json()["meta_info"]["cached_tokens"] == 0


def test_v1_models(main_server: ServerProcess) -> None:
    models = main_server.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    card = main_server.get("/v1/models/tiny").json()
    assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 2048


def _samples(text: str) -> dict[str, float]:
    """Prometheus text exposition: ``name{labels}`` -> value."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def _metric(samples: dict[str, float], name: str, required: bool = True) -> float:
    """The one sample called ``name`` (labels aside); labelled series appear on first use."""
    hits = [v for k, v in samples.items() if re.fullmatch(re.escape(name) + r"(\{.*\})?", k)]
    assert len(hits) == 1 or not (hits or required), (name, [k for k in samples if k.startswith(name)])
    return hits[0] if hits else 0.0


def test_metrics(main_server: ServerProcess) -> None:
    before = _samples(main_server.get("/metrics").text)
    body = {"prompt": prompt_ids(10, seed=6), "max_tokens": 5, "ignore_eos": True, "temperature": 0, "stream": True}
    assert main_server.post("/v1/completions", body).status_code == 200
    resp = main_server.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    after = _samples(resp.text)
    for counter, delta in [
        ("pdserve:num_requests_total", 1),
        ("pdserve:generation_tokens_total", 5),
        ("pdserve:prompt_tokens_total", 10),
    ]:
        assert _metric(after, counter) - _metric(before, counter, required=False) == delta, counter
    assert _metric(after, "pdserve:time_to_first_token_seconds_count") >= 1
    assert _metric(after, "pdserve:inter_token_latency_seconds_count") >= 4
    assert _metric(after, "pdserve:e2e_request_latency_seconds_count") >= 1
    assert _metric(after, "pdserve:time_to_first_token_seconds_sum") > 0
    for gauge in ("pdserve:num_running_reqs", "pdserve:num_queue_reqs", "pdserve:token_usage", "pdserve:kv_used_pages"):
        assert _metric(after, gauge) >= 0


def test_metrics_disabled(small_server: ServerProcess) -> None:
    assert_openai_error(small_server.get("/metrics"), 404, code=404)
