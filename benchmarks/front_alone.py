"""The HTTP front alone, fed by a stand-in engine as fast as a GPU.

A real engine on a CPU makes a few hundred tokens a second, far too few to
load a front; on a GPU the front must stream tens of thousands. This runs the
real ``pdserve serve`` front (routes, detokenizer, SSE, the engine pipe and
its messages) against ``token_engine_main``: a process that speaks the engine's
protocol and gives every running request one token per ``--step-ms`` (token
ids cycling through the vocabulary, ``max_new_tokens`` of them, then
``length``), like a decode batch. ``pdserve bench`` is the client; the front's
CPU time per streamed token is read from ``/proc``.

    python -m pdserve.benchmarks.front_alone --concurrency 64 --output-len 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
from pdserve.common import codec
from pdserve.common.args import add_dataclass_args, config_from_args, flag
from pdserve.common.config import ServerConfig
from pdserve.common.messages import (
    AbortRequest,
    ControlRequest,
    ControlResponse,
    EngineReady,
    GenerateRequest,
    TokenBatch,
    TokenOutput,
)


@dataclass
class _Running:
    rid: str
    prompt_tokens: int
    max_new_tokens: int
    sent: int = 0
    next_id: int = 0


class TokenEngine:
    """The engine's side of the pipe, with a fixed step time instead of a model."""

    def __init__(self, conn: Connection, step_s: float, vocab_size: int) -> None:
        self.conn, self.step_s, self.vocab_size = conn, step_s, vocab_size
        self.running: dict[str, _Running] = {}

    def serve(self, ready: EngineReady) -> None:
        self.conn.send_bytes(codec.encode(ready))
        next_step_s = time.monotonic()
        while True:
            wait_s = max(next_step_s - time.monotonic(), 0.0) if self.running else 0.05
            try:
                while self.conn.poll(wait_s):
                    self._handle(codec.decode(self.conn.recv_bytes()))
                    wait_s = 0.0
            except (EOFError, OSError):
                return
            if self.running and time.monotonic() >= next_step_s:
                self.conn.send_bytes(codec.encode(self._step()))
                next_step_s += self.step_s
            elif not self.running:
                next_step_s = time.monotonic()

    def _handle(self, msg: object) -> None:
        if isinstance(msg, GenerateRequest):
            self.running[msg.rid] = _Running(msg.rid, len(msg.input_ids), msg.params.max_new_tokens,
                                             next_id=len(msg.input_ids) % self.vocab_size)
        elif isinstance(msg, AbortRequest):
            self.running.pop(msg.rid, None)
        elif isinstance(msg, ControlRequest):
            self.conn.send_bytes(codec.encode(ControlResponse(req_id=msg.req_id, ok=True, data={})))

    def _step(self) -> TokenBatch:
        batch = TokenBatch()
        for req in list(self.running.values()):
            token = req.next_id
            req.next_id = (req.next_id + 7) % self.vocab_size
            req.sent += 1
            if req.sent == 1 or req.sent >= req.max_new_tokens:
                done = req.sent >= req.max_new_tokens
                batch.outputs.append(TokenOutput(rid=req.rid, token_ids=[token], prompt_tokens=req.prompt_tokens,
                                                 finish_reason="length" if done else None))
                if done:
                    del self.running[req.rid]
            else:
                batch.rids.append(req.rid)
                batch.token_ids.append([token])
        return batch


def token_engine_main(step_s: float, cfg: ServerConfig, model_dir: str, conn: Connection,
                      num_text_tokens: int | None = None) -> None:
    """Engine entry point of the stand-in; ``partial(token_engine_main, step_s)`` is an ``EngineMain``."""
    vocab = num_text_tokens or 256
    ready = EngineReady(context_len=8192, vocab_size=vocab, max_total_num_tokens=1 << 20,
                        max_running_requests=1024, page_size=cfg.page_size, dtype="none", device="cpu",
                        attention_backend="none")
    TokenEngine(conn, step_s, vocab).serve(ready)


@dataclass(frozen=True)
class FrontAloneConfig:
    concurrency: int = field(default=64, metadata=flag("requests in flight (= the stand-in's batch)"))
    output_len: int = field(default=512, metadata=flag("tokens per request"))
    input_len: int = field(default=64, metadata=flag("prompt tokens (random ids)"))
    num_prompts: int = field(default=256, metadata=flag("requests in the measured run"))
    step_ms: float = field(default=2.0, metadata=flag("the stand-in engine's step: one token per running request"))
    port: int = field(default=31900, metadata=flag("the front's port"))
    output_json: str | None = field(default=None, metadata=flag("write the figures here (default: print only)"))


def _serve(port: int, step_s: float) -> int:
    """The front process: the real ``pdserve serve`` front, the stand-in engine behind it."""
    from functools import partial

    from pdserve.model.builtin import resolve_model_path
    from pdserve.server.app import run

    cfg = ServerConfig(port=port, skip_server_warmup=True, log_level="warning").resolve()
    return run(cfg, resolve_model_path(None), partial(token_engine_main, step_s))


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def _bench(cfg: FrontAloneConfig, url: str, out: Path, num_prompts: int) -> dict:
    cmd = [sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--backend", "openai",
           "--dataset", "random-ids", "--random-input-len", str(cfg.input_len), "--random-output-len",
           str(cfg.output_len), "--num-prompts", str(num_prompts), "--max-concurrency", str(cfg.concurrency),
           "--ignore-eos", "--disable-tqdm", "--warmup-requests", "0", "--output-json", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())["runs"][0]["metrics"]


def measure(cfg: FrontAloneConfig) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.benchmarks.front_alone", "--serve",
                             "--port", str(cfg.port), "--step-ms", str(cfg.step_ms)])
    url = f"http://127.0.0.1:{cfg.port}"
    try:
        _wait_healthy(url, proc)
        with tempfile.TemporaryDirectory() as tmp:
            _bench(cfg, url, Path(tmp) / "warm.json", cfg.concurrency)
            before = _cpu_s(proc.pid)
            metrics = _bench(cfg, url, Path(tmp) / "run.json", cfg.num_prompts)
            front_s = _cpu_s(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tokens = metrics["total_output_tokens"]
    return {"config": cfg.__dict__, "output_tokens": tokens, "front_cpu_s": front_s,
            "front_cpu_us_per_token": front_s * 1e6 / max(tokens, 1),
            "output_tokens_per_s": metrics["output_throughput"], "itl_p50_ms": metrics["itl_ms"]["median"]}


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the front at {url} did not become healthy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.front_alone",
                                     description="CPU per streamed token of the HTTP front, fed by a stand-in engine.")
    add_dataclass_args(parser, FrontAloneConfig)
    parser.add_argument("--serve", action="store_true", help="run the front itself (used by the measurement)")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(FrontAloneConfig, ns)
    if ns.serve:
        return _serve(cfg.port, cfg.step_ms / 1e3)
    result = measure(cfg)
    print(f"front: {result['front_cpu_us_per_token']:.1f} us CPU per streamed token "
          f"({result['output_tokens']} tokens, {result['output_tokens_per_s']:.0f} tok/s, "
          f"ITL p50 {result['itl_p50_ms']:.2f} ms)")
    if cfg.output_json:
        Path(cfg.output_json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
