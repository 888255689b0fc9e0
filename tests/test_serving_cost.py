"""The pieces of ``benchmarks/serving_cost.py`` that need no model: the fake
upstream's SSE stream, the /proc CPU-time reader, the profile summary and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from pdserve.benchmarks import serving_cost
from pdserve.benchmarks.fake_upstream import SENT_AT_KEY
from pdserve.benchmarks.serving import cpu, procs
from pdserve.benchmarks.serving.config import FrontConfig, RouterBenchConfig, Workload
from pdserve.benchmarks.serving.profiles import summarise_collapsed
from pdserve.benchmarks.serving.router import Upstream, router_argv
from pdserve.common.args import config_from_args
from pdserve.tests.support.health import wait_healthy
from pdserve.tests.support.openai_errors import assert_openai_error
from pdserve.tests.support.ports import free_port
from pdserve.tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Fake:
    url: str
    prefill_url: str


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    port, prefill_port = free_port(), free_port()
    argv = procs.python_module("pdserve.benchmarks.fake_upstream", "--port", str(port),
                                      "--prefill-port", str(prefill_port), "--token-interval-ms", "2")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up = Fake(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prefill_port}")
    try:
        wait_healthy(up.url, 20.0, proc=proc, describe=lambda: "the fake upstream did not start")
        yield up
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _sse_payloads(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_fake_streams_one_chunk_per_token_then_usage_and_done(fake: Fake) -> None:
    body = {"model": "fake-model", "prompt": [1, 2, 3], "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", fake.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["transfer-encoding"] == "chunked"
            payloads = _sse_payloads(resp)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    tokens = [c for c in chunks if c["choices"]]
    assert len(tokens) == 7
    assert all(c["choices"][0]["text"] == " tok" and SENT_AT_KEY in c for c in tokens)
    assert [c["choices"][0]["finish_reason"] for c in tokens][-2:] == [None, "length"]
    sent = [c[SENT_AT_KEY] for c in tokens]
    assert sent == sorted(sent) and sent[-1] - sent[0] >= 6 * 0.002 * 0.9
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}


def test_fake_keeps_the_connection_and_answers_unstreamed_and_info(fake: Fake) -> None:
    with httpx.Client(timeout=10) as client:
        for _ in range(2):
            with client.stream("POST", fake.url + "/v1/completions",
                               json={"prompt": "a b", "max_tokens": 3, "stream": True}) as resp:
                payloads = _sse_payloads(resp)
            assert len(payloads) == 4 and payloads[-1] == "[DONE]"
        full = client.post(fake.url + "/v1/completions", json={"prompt": "a b", "max_tokens": 3}).json()
        assert full["choices"][0]["text"] == " tok tok tok"
        assert full["usage"]["completion_tokens"] == 3
        assert client.get(fake.url + "/v1/models").json()["data"][0]["id"] == "fake-model"
        assert client.get(fake.url + "/get_server_info").json()["instance_id"]
        assert client.get(fake.url + "/get_model_info").status_code == 200


def test_fake_prefill_port_answers_at_once(fake: Fake) -> None:
    answer = httpx.post(fake.prefill_url + "/v1/completions",
                        json={"prompt": [1], "max_tokens": 500, "stream": True}, timeout=5).json()
    assert answer["usage"]["completion_tokens"] == 0
    assert httpx.get(fake.prefill_url + "/get_server_info", timeout=5).json()["instance_id"]


def test_fake_answers_what_it_does_not_serve_with_openai_errors(fake: Fake) -> None:
    with httpx.Client(timeout=10) as client:
        assert_openai_error(client.get(fake.url + "/nowhere"), 404, "/nowhere")
        assert_openai_error(client.post(fake.url + "/nowhere", json={}), 404, "/nowhere")
        assert_openai_error(client.post(fake.url + "/v1/completions", content=b"{oops"), 400, "bad JSON")


def test_proc_cpu_time_grows_for_a_busy_process() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        first = cpu.proc_cpu_s(busy.pid)
        assert first is not None
        wait_until(lambda: cpu.proc_cpu_s(busy.pid) - first >= 0.1, 10.0, 0.05,
                   lambda: f"CPU time stuck at {cpu.proc_cpu_s(busy.pid)} s (from {first} s)")
        snapshot = cpu.CpuSnapshot.take([busy.pid])
        wait_until(lambda: cpu.CpuSnapshot.take([busy.pid]).since(snapshot) > 0, 10.0, 0.05,
                   "the snapshot saw no CPU time")
    finally:
        busy.kill()
        busy.wait(timeout=10)
    assert cpu.proc_cpu_s(busy.pid) is None


def test_process_tree_and_engine_split_by_cmdline() -> None:
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', 'spawn_main']); "
              "time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_until(lambda: len(cpu.process_tree(parent.pid)) >= 2, 10.0, 0.05, "the child never showed")
        front, engine = cpu.split_front_engine(parent.pid)
        assert front == [parent.pid]
        assert len(engine) == 1 and "spawn_main" in cpu.proc_cmdline(engine[0])
    finally:
        for pid in cpu.process_tree(parent.pid)[::-1]:
            os.kill(pid, 9)
        parent.wait(timeout=10)


def test_summarise_collapsed_counts_inclusive_once_per_stack() -> None:
    text = "main;loop;work 3\nmain;loop;loop 1\nmain;idle 2\n"
    summary = summarise_collapsed(text, top_n=3)
    assert summary["total_samples"] == 6
    incl = {r["function"]: r["samples"] for r in summary["top_inclusive"]}
    assert incl == {"main": 6, "loop": 4, "work": 3}
    own = {r["function"]: r["samples"] for r in summary["top_own"]}
    assert own == {"work": 3, "idle": 2, "loop": 1}


def test_cli_builds_each_config_from_its_flags() -> None:
    parser = serving_cost.build_parser()
    front = config_from_args(FrontConfig, parser.parse_args(
        ["front", "--concurrency", "8", "--modes", "stream", "--", "--max-running-requests", "8"]))
    assert front == FrontConfig(workload=Workload(concurrency=8), modes=("stream",),
                                server_args=("--max-running-requests", "8"))
    router = config_from_args(RouterBenchConfig, parser.parse_args(
        ["router", "--targets", "direct", "pdserve", "--num-prompts", "16"]))
    assert router == RouterBenchConfig(workload=Workload(num_prompts=16), targets=("direct", "pdserve"))
    assert config_from_args(RouterBenchConfig, parser.parse_args(["router"])) == RouterBenchConfig()
    bounded = config_from_args(RouterBenchConfig, parser.parse_args(["router", "--max-tree-chars", "20000"]))
    assert bounded.max_tree_chars == 20000


def test_only_pdserve_routers_get_the_tree_bound() -> None:
    up = Upstream(url="http://127.0.0.1:1", prefill_url="http://127.0.0.1:2", child=None)
    pdserve_argv = router_argv("pdserve", 9, up, "cache_aware", 20000)
    assert pdserve_argv[pdserve_argv.index("--max-tree-chars") + 1] == "20000"
    assert "--max-tree-chars" not in router_argv("pdserve", 9, up, "cache_aware")
    assert "--max-tree-chars" not in " ".join(router_argv("sglang", 9, up, "cache_aware", 20000))
