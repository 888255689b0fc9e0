"""Test helpers: a real ``pdserve serve`` subprocess, and the Hugging Face oracle.

:func:`start_server` launches an instance on a free port with the given flags,
waits for ``/health`` to answer 200 and hands back a :class:`ServerProcess`
whose log (stdout and stderr) goes to a file. :class:`HFOracle` loads the same
built-in weights with transformers and gives the greedy continuations and
per-step log-probabilities the server must reproduce.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 10.0
HEALTH_POLL_S = 0.1
REQUEST_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """One running ``pdserve serve``; ``api_key`` is sent on every helper call."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None
    flags: tuple[str, ...] = field(default_factory=tuple)
    # What /health said while the engine was still starting (None if never seen).
    not_ready_status: int | None = None
    not_ready_body: dict | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout_s)

    def async_client(self, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout_s)

    def post(self, path: str, body: dict, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=timeout_s)

    def get(self, path: str, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=timeout_s)

    def server_info(self) -> dict:
        resp = self.get("/get_server_info")
        resp.raise_for_status()
        return resp.json()

    def wait_idle(self, timeout_s: float = 5.0) -> dict:
        """Poll until no request holds KV pages (aborts are asynchronous); return the info."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.server_info()
            idle = info["kv_pool"]["used_pages"] == 0 and info["num_running_reqs"] == 0 and info["num_queued_reqs"] == 0
            if idle or time.monotonic() > deadline:
                return info
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (graceful: the front stops its engine), then SIGKILL the group."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            # The engine is a child in the same session; make sure it is gone too.
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(SHUTDOWN_TIMEOUT_S)


def start_server(
    flags: list[str] | tuple[str, ...], log_path: Path, api_key: str | None = None, timeout_s: float = STARTUP_TIMEOUT_S
) -> ServerProcess:
    """Start ``pdserve serve`` with ``flags`` on a free port and wait until it is healthy."""
    port = free_port()
    argv = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port), *flags]
    if api_key:
        argv += ["--api-key", api_key]
    log = open(log_path, "wb")  # the child inherits the descriptor and keeps writing
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()
    server = ServerProcess(proc, port, log_path, api_key, tuple(flags))
    try:
        _wait_healthy(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def served(flags: list[str] | tuple[str, ...], log_path: Path, api_key: str | None = None) -> Iterator[ServerProcess]:
    """A server for the duration of a ``with`` block (module and session fixtures)."""
    server = start_server(flags, log_path, api_key)
    try:
        yield server
    finally:
        server.stop()


def _wait_healthy(server: ServerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"pdserve serve exited with {server.proc.returncode}:\n{server.log_text()[-4000:]}")
        try:
            resp = httpx.get(server.url + "/health", timeout=2.0)
            if resp.status_code == 200:
                return
            if server.not_ready_status is None:
                server.not_ready_status, server.not_ready_body = resp.status_code, resp.json()
        except httpx.HTTPError:
            pass
        time.sleep(HEALTH_POLL_S)
    raise TimeoutError(f"pdserve serve not healthy after {timeout_s:.0f}s:\n{server.log_text()[-4000:]}")


class HFOracle:
    """The built-in model under transformers: the reference for greedy decoding."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._cache: dict[tuple[tuple[int, ...], int], tuple[list[int], list[list[float]]]] = {}

    def _run(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], list[list[float]]]:
        key = (tuple(ids), max_new_tokens)
        if key not in self._cache:
            from transformers import GenerationConfig

            # eos_token_id=None: decode exactly max_new_tokens, as ignore_eos does.
            gen_cfg = GenerationConfig(
                do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
                output_logits=True, return_dict_in_generate=True,
            )
            input_ids = self._torch.tensor([ids])
            # An explicit mask: generate() would otherwise mask every pad_token_id (BOS here).
            mask = self._torch.ones_like(input_ids)
            with self._torch.no_grad():
                out = self.model.generate(input_ids, attention_mask=mask, generation_config=gen_cfg)
            new_ids = out.sequences[0, len(ids) :].tolist()
            logprobs = [self._torch.log_softmax(step[0].float(), dim=-1).tolist() for step in out.logits]
            self._cache[key] = (new_ids, logprobs)
        return self._cache[key]

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy continuation of ``ids``, EOS ignored."""
        return list(self._run(ids, max_new_tokens)[0])

    def greedy_logprobs(self, ids: list[int], max_new_tokens: int) -> list[float]:
        """log_softmax of the raw logits at each step, at the greedy token."""
        new_ids, steps = self._run(ids, max_new_tokens)
        return [steps[i][t] for i, t in enumerate(new_ids)]

    def top_logprobs(self, ids: list[int], max_new_tokens: int, k: int) -> list[list[tuple[int, float]]]:
        _, steps = self._run(ids, max_new_tokens)
        result = []
        for step in steps:
            order = sorted(range(len(step)), key=lambda t: -step[t])[:k]
            result.append([(t, step[t]) for t in order])
        return result

    def chat_ids(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # Newer transformers return a BatchEncoding here, older ones a list.
        return list(out if isinstance(out, list) else out["input_ids"])

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


# ---- request helpers ------------------------------------------------------------


def prompt_ids(length: int, seed: int, vocab_size: int = 1000, first_id: int = 4) -> list[int]:
    """Reproducible ordinary token ids (the tiny model's first ids are special)."""
    rng = random.Random(seed)
    return [rng.randrange(first_id, vocab_size) for _ in range(length)]


def generate_body(ids: list[int], max_new_tokens: int, **sampling: object) -> dict:
    """A greedy, EOS-ignoring /generate body unless ``sampling`` says otherwise."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True, **sampling}
    return {"input_ids": ids, "sampling_params": params}


def post_concurrently(server: ServerProcess, path: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send every body at once (one connection each) and return responses in order."""
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(lambda body: server.post(path, body), bodies))


def sse_events(resp: httpx.Response) -> list[dict]:
    """The JSON events of a finished SSE response, up to ``[DONE]`` (which must come)."""
    events = []
    for line in resp.text.splitlines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            return events
        events.append(json.loads(payload))
    raise AssertionError(f"stream ended without [DONE]: {resp.text[-500:]}")


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    """The response is an OpenAI error object with ``status`` (and ``param``, if given)."""
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error
