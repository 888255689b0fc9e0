"""A stand-in engine as fast as a GPU, behind the real ``pdserve serve`` front.

A real engine on a CPU makes a few hundred tokens a second, far too few to
load a front; on a GPU the front must stream tens of thousands. The stand-in
speaks the engine's protocol and gives every running request one token per
step (token ids cycling through the vocabulary, ``max_new_tokens`` of them,
then ``length``), like a decode batch, so that the front's cost can be
measured at GPU pace on a CPU-only host.

    python -m pdserve.benchmarks.serving.token_engine --port 31900 --step-ms 2
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection

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

IDLE_POLL_S = 0.05
DEFAULT_VOCAB = 256
TOKEN_STRIDE = 7


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
            wait_s = max(next_step_s - time.monotonic(), 0.0) if self.running else IDLE_POLL_S
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
            self.conn.send_bytes(codec.encode(ControlResponse(req_id=msg.req_id, ok=True)))

    def _step(self) -> TokenBatch:
        batch = TokenBatch()
        for req in list(self.running.values()):
            token = req.next_id
            req.next_id = (req.next_id + TOKEN_STRIDE) % self.vocab_size
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
    vocab = num_text_tokens or DEFAULT_VOCAB
    ready = EngineReady(context_len=8192, vocab_size=vocab, max_total_num_tokens=1 << 20,
                        max_running_requests=1024, page_size=cfg.page_size, dtype="none", device="cpu",
                        attention_backend="none")
    TokenEngine(conn, step_s, vocab).serve(ready)


@dataclass(frozen=True)
class StandInConfig:
    """The front process: where it listens and the stand-in's step."""

    port: int = field(default=31900, metadata=flag("the front's port"))
    step_ms: float = field(default=2.0, metadata=flag("the stand-in engine's step: one token per running request"))


def serve_front(cfg: StandInConfig) -> int:
    """The real ``pdserve serve`` front on 127.0.0.1, the stand-in engine behind it."""
    from pdserve.model.builtin import resolve_model_path
    from pdserve.server.app import run

    server_cfg = ServerConfig(port=cfg.port, skip_server_warmup=True, log_level="warning").resolve()
    return run(server_cfg, resolve_model_path(None), partial(token_engine_main, cfg.step_ms / 1e3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.serving.token_engine",
                                     description="The real front with a stand-in engine behind it.")
    add_dataclass_args(parser, StandInConfig)
    return serve_front(config_from_args(StandInConfig, parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
