"""A keyed PD cluster from `pdserve up`: an API key on the router and every instance,
a cluster secret on the bootstrap service, neither on any command line. The router
reaches the keyed instances and answers as a colocated instance does; nothing but
/health answers anyone without the key."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pdserve.bootstrap.protocol import TOKEN_HEADER
from pdserve.tests.support.clusters import start_up, up_command
from pdserve.tests.support.fake_worker import make_info
from pdserve.tests.support.openai_errors import assert_openai_error
from pdserve.tests.support.payloads import generate_body, prompt_ids
from pdserve.tests.support.ports import free_port_block
from pdserve.tests.support.processes import command_line, descendants, stop_process
from pdserve.tests.support.server_process import ServerProcess, server_fixture, start_server

API_KEY = "pd-api-key-7f3a"
SECRET = "pd-cluster-secret-91c2"
SERVE_ARGS = ("--page-size", "4", "--chunked-prefill-size", "16", "--max-total-tokens", "2048", "--skip-server-warmup")
STARTUP_TIMEOUT_S = 240.0
KEY = {"Authorization": f"Bearer {API_KEY}"}
CLUSTER = {"Authorization": f"bearer {SECRET}"}


@dataclass
class KeyedUp:
    launcher: subprocess.Popen
    first_port: int

    @property
    def router(self) -> str:
        return f"http://127.0.0.1:{self.first_port}"

    @property
    def bootstrap(self) -> str:
        return f"http://127.0.0.1:{self.first_port + 1}"

    @property
    def instances(self) -> list[str]:
        return [f"http://127.0.0.1:{self.first_port + 2 + i}" for i in range(2)]


@pytest.fixture(scope="module")
def keyed_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedUp]:
    tmp = tmp_path_factory.mktemp("keyed-up")
    secret_file = tmp / "cluster-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    first = free_port_block(4)
    argv = up_command(first, tmp / "logs", STARTUP_TIMEOUT_S, SERVE_ARGS, "--cluster-secret-file", str(secret_file))
    environ = {**os.environ, "PDSERVE_API_KEY": API_KEY}  # the key reaches `pdserve up` off its command line too
    launcher = start_up(argv, tmp / "up.out", STARTUP_TIMEOUT_S + 30, env=environ)
    try:
        yield KeyedUp(launcher, first)
    finally:
        stop_process(launcher, timeout_s=60.0)


keyed_colocated = server_fixture(SERVE_ARGS, "keyed-colocated.log", api_key=API_KEY)


def test_router_reaches_keyed_instances_and_answers_as_colocated(keyed_up: KeyedUp,
                                                                 keyed_colocated: ServerProcess) -> None:
    workers = httpx.get(keyed_up.router + "/workers", headers=KEY, timeout=10).json()
    assert sorted((w["role"], w["healthy"]) for w in workers) == [("decode", True), ("prefill", True)], workers
    for seed, length in enumerate((3, 9, 17, 40)):
        body = generate_body(prompt_ids(length, seed), 8)
        pd = httpx.post(keyed_up.router + "/generate", json=body, headers=KEY, timeout=120)
        assert pd.status_code == 200, pd.text
        colocated = keyed_colocated.post("/generate", body)
        assert colocated.status_code == 200, colocated.text
        assert pd.json()["output_ids"] == colocated.json()["output_ids"], f"prompt of {length} tokens"
    completion = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    streamed = httpx.post(keyed_up.router + "/v1/completions", json={**completion, "stream": True},
                          headers={"Authorization": f"BEARER {API_KEY}"}, timeout=120)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]"), streamed.text
    info = httpx.get(keyed_up.router + "/get_server_info", headers=KEY, timeout=30).json()
    assert all(i["server_info"] and i["server_info"]["kv_pool"]["used_pages"] == 0 for i in info["instances"])


def test_nothing_but_health_answers_without_the_key(keyed_up: KeyedUp) -> None:
    body = generate_body([5, 6, 7], 2)
    for url in [keyed_up.router, *keyed_up.instances]:
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {SECRET}"}):
            assert_openai_error(httpx.post(url + "/generate", json=body, headers=headers, timeout=30), 401)
            assert_openai_error(httpx.get(url + "/get_server_info", headers=headers, timeout=30), 401)
    assert httpx.get(keyed_up.bootstrap + "/health", timeout=10).status_code == 200
    for headers in ({}, KEY):  # the API key is not the cluster secret
        assert_openai_error(httpx.get(keyed_up.bootstrap + "/instances", headers=headers, timeout=10), 401)
    live = httpx.get(keyed_up.bootstrap + "/instances", headers=CLUSTER, timeout=10).json()
    assert sorted(i["role"] for i in live) == ["decode", "prefill"]
    # Even with the secret, a live instance is not another registrant's to take.
    prefill = next(i for i in live if i["role"] == "prefill")
    impostor = make_info(prefill["instance_id"], "prefill", http_url="http://127.0.0.1:9").to_json()
    taken = httpx.post(keyed_up.bootstrap + "/register", json=impostor, headers={**CLUSTER, TOKEN_HEADER: "mine"})
    assert_openai_error(taken, 409, "another process", code="instance_id_in_use")
    gone = httpx.delete(f"{keyed_up.bootstrap}/instances/{prefill['instance_id']}", headers=CLUSTER)
    assert_openai_error(gone, 409, "another process")
    still = httpx.get(f"{keyed_up.bootstrap}/instances/{prefill['instance_id']}", headers=CLUSTER).json()
    assert still["http_url"] == prefill["http_url"]


def test_key_and_secret_stay_off_command_lines(keyed_up: KeyedUp) -> None:
    pids = descendants(keyed_up.launcher.pid) | {keyed_up.launcher.pid}
    assert len(pids) >= 7  # launcher, bootstrap, router, two fronts and their engines
    lines = {pid: command_line(pid) for pid in pids}
    assert not [line for line in lines.values() if API_KEY in line or SECRET in line], lines


def test_an_instance_without_the_secret_cannot_join(keyed_up: KeyedUp, tmp_path: Path) -> None:
    flags = ("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-url", keyed_up.bootstrap,
             "--cluster-secret", "not-the-secret", *SERVE_ARGS)
    with pytest.raises(RuntimeError, match=r"(?s)exited with.*bootstrap register failed \(401\)"):
        start_server(flags, tmp_path / "stranger.log")
    live = httpx.get(keyed_up.bootstrap + "/instances", headers=CLUSTER, timeout=10).json()
    assert sorted(i["role"] for i in live) == ["decode", "prefill"]
