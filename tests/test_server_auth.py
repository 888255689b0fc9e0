"""--api-key: every endpoint but /health (and /metrics with --open-metrics) wants
``Authorization: Bearer KEY``, the scheme in any case."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pdserve.tests.support.openai_errors import assert_openai_error
from pdserve.tests.support.server_process import ServerProcess, server_fixture

API_KEY = "test-key-123"
PROTECTED = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}}),
    ("GET", "/health_generate", None),
    ("GET", "/get_model_info", None),
    ("GET", "/get_server_info", None),
    ("POST", "/flush_cache", None),
    ("GET", "/metrics", None),
]


auth_server = server_fixture(("--page-size", "4", "--max-total-tokens", "1024"), "auth.log", api_key=API_KEY)


def test_health_needs_no_key(auth_server: ServerProcess) -> None:
    assert httpx.get(auth_server.url + "/health").status_code == 200


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_endpoint_requires_key(auth_server: ServerProcess, method: str, path: str, body: dict | None) -> None:
    url = auth_server.url + path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        resp = httpx.request(method, url, json=body, headers=headers, timeout=30)
        assert_openai_error(resp, 401, code="invalid_api_key")
    ok = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    # /metrics is off on this server: past the key check it is a 404, not a 401.
    assert ok.status_code == (404 if path == "/metrics" else 200), ok.text


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(auth_server: ServerProcess, scheme: str) -> None:
    resp = httpx.get(auth_server.url + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("header", [b"Bearer", f"Bearer {API_KEY}x".encode(), f"Basic {API_KEY}".encode(),
                                    "Bearer t\u00e9st-key-123".encode(), b"Bearer \xff\xfe", f"Bearer{API_KEY}".encode()])
def test_wrong_or_odd_headers_are_401_never_500(auth_server: ServerProcess, header: bytes) -> None:
    resp = httpx.get(auth_server.url + "/v1/models", headers={"Authorization": header})
    assert_openai_error(resp, 401, code="invalid_api_key")


open_metrics_server = server_fixture(
    ("--page-size", "4", "--max-total-tokens", "1024", "--skip-server-warmup", "--enable-metrics", "--open-metrics"),
    "open-metrics.log", api_key=API_KEY)


def test_metrics_answer_without_the_key_only_with_open_metrics(open_metrics_server: ServerProcess,
                                                               auth_server: ServerProcess) -> None:
    resp = httpx.get(open_metrics_server.url + "/metrics")
    assert resp.status_code == 200 and "pdserve" in resp.text
    assert httpx.get(open_metrics_server.url + "/health").status_code == 200
    for path in ("/v1/models", "/get_server_info", "/metrics/", "/metricsx"):
        assert_openai_error(httpx.get(open_metrics_server.url + path), 401)
    assert_openai_error(httpx.get(auth_server.url + "/metrics"), 401)


def test_serve_reads_key_and_secret_from_flags_file_or_environment(tmp_path: Path, monkeypatch) -> None:
    from pdserve.serve import parse_config

    path = tmp_path / "secret"
    path.write_text("from-file\n")
    cfg = parse_config(["--api-key", "k1", "--cluster-secret-file", str(path)])
    assert (cfg.api_key, cfg.cluster_secret) == ("k1", "from-file")
    assert "k1" not in repr(cfg) and "from-file" not in repr(cfg)
    monkeypatch.setenv("PDSERVE_API_KEY", "k2")
    monkeypatch.setenv("PDSERVE_CLUSTER_SECRET", "s2")
    assert (parse_config([]).api_key, parse_config([]).cluster_secret) == ("k2", "s2")
    assert parse_config(["--cluster-secret", "s3"]).cluster_secret == "s3"
    with pytest.raises(SystemExit):
        parse_config(["--cluster-secret-file", str(tmp_path / "missing")])
