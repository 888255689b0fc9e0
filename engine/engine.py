"""The engine process: one loop of receive, schedule, forward, sample, emit.

It owns the model, the KV pool, the scheduler and (in PD roles) the transfer
agent. It talks to the HTTP front only through msgpack messages on a pipe, so
nothing the front does in Python can stall a step.
"""

from __future__ import annotations

import logging
import operator
import os
import select
import threading
import time
from multiprocessing.connection import Connection

import numpy as np
import torch
from pdserve.common import codec
from pdserve.common.config import ServerConfig
from pdserve.common.messages import (
    AbortRequest,
    ControlKind,
    ControlRequest,
    ControlResponse,
    EngineFailed,
    EngineReady,
    EngineStats,
    GenerateRequest,
    KVPoolStats,
    TokenBatch,
    TokenOutput,
)
from pdserve.common.startup import StartupError, one_line
from pdserve.engine.radix_cache import RadixCache
from pdserve.engine.request import Req
from pdserve.engine.role import ColocatedRole, EngineRole
from pdserve.engine.sampler import Sampler, SampleResult
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.engine.tp import Followers, RankHello, RankLink, follow
from pdserve.model.batch import ScheduledBatch
from pdserve.model.config import ModelConfig
from pdserve.model.kernels.step_inputs import to_device
from pdserve.model.runner import ModelRunner

logger = logging.getLogger("pdserve.engine")

# How long an idle engine with rooms in flight waits on its front before it
# checks them again. On a GPU a transfer lands in tens of microseconds, so the
# wait is what decode would lose on every request; on a CPU host the engines
# share a few cores with each other, so it polls less often.
PD_POLL_WAIT_S = {"cuda": 1e-4, "cpu": 2e-3}

# The fed chunk of a row whose token the ahead step reads on the device: a
# placeholder, never read (one shared list: nothing writes to fed chunks).
_ON_DEVICE = [0]


class Histories:
    """(prompt ids, output ids) of each sampled request, as the sampler reads
    them: only rows with penalties or seeds are ever asked for."""

    __slots__ = ("_reqs",)

    def __init__(self, reqs: list[Req]):
        self._reqs = reqs

    def __len__(self) -> int:
        return len(self._reqs)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        req = self._reqs[i]
        return req.prompt_ids, req.output_ids


class RequestRejected(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Engine:
    def __init__(self, cfg: ServerConfig, model_dir: str, conn: Connection, num_text_tokens: int | None = None,
                 followers: Followers | None = None, role: type[EngineRole] = ColocatedRole):
        self.cfg = cfg
        self.conn = conn
        # ``Connection.poll`` builds a selector per call (~10 us); the loop asks every turn.
        self._inbox = select.poll()
        self._inbox.register(conn.fileno(), select.POLLIN)
        self.model_cfg = ModelConfig.from_dir(model_dir)
        # The other ranks of a tensor-parallel instance (engine/tp.py); None at TP 1.
        self.followers = followers
        if followers is not None:
            followers.start_watch()
        self.runner = ModelRunner(cfg, model_dir, self.model_cfg)
        self.rank_pids: list[int] = [os.getpid()]
        if followers is not None:
            self.rank_pids += followers.ready_pids(cfg.dist_timeout_s)
            self.runner.step_hook = followers.send_step
        self.pool = self.runner.pool
        self.cache = RadixCache(self.pool, enabled=not cfg.disable_radix_cache)
        self.scheduler = Scheduler(self._scheduler_config(), self.pool, self.cache)
        self.sampler = Sampler(cfg.random_seed, self.runner.device, self.model_cfg.eos_token_ids)
        self.eos_ids = set(self.model_cfg.eos_token_ids)
        # Rows of the LM head past the tokenizer (padding, or a dummy config's
        # vocabulary paired with a smaller tokenizer) can never become text.
        self.num_text_tokens = min(num_text_tokens or self.model_cfg.vocab_size, self.model_cfg.vocab_size)
        self.batch = TokenBatch()  # outputs not sent yet: flushed after the role's poll and at the turn's end
        self.num_decode_steps = 0
        self.num_generated_tokens = 0
        self._log_window = (time.monotonic(), 0)
        self._step_started_s: float | None = None
        poll_ms = cfg.disaggregation_poll_interval_ms
        self.pd_poll_wait_s = poll_ms / 1e3 if poll_ms is not None else PD_POLL_WAIT_S.get(self.runner.device.type, PD_POLL_WAIT_S["cpu"])
        # A process blocked on a pipe takes 0.1-0.3 ms to wake on a GPU host (its
        # core sleeps), on the path of every first token; polling keeps one core busy.
        self.spin_while_idle = cfg.pipe_poll_limit(self.runner.device.type) > 0
        self.role = role(self)
        self._log_startup()

    def _scheduler_config(self) -> SchedulerConfig:
        cfg = self.cfg
        default_running = 256 if self.runner.device.type == "cuda" else 64
        return SchedulerConfig(
            page_size=cfg.page_size,
            max_running_requests=cfg.max_running_requests or default_running,
            chunked_prefill_size=None if cfg.chunked_prefill_size == -1 else cfg.chunked_prefill_size,
            max_prefill_tokens=cfg.max_prefill_tokens,
            schedule_policy=cfg.schedule_policy,
            schedule_conservativeness=cfg.schedule_conservativeness,
            context_len=self.runner.context_len,
        )

    def _log_startup(self) -> None:
        info, sc = self.runner.info(), self.scheduler.cfg
        logger.info(
            "max_total_num_tokens=%d, chunked_prefill_size=%s, max_prefill_tokens=%d, "
            "max_running_requests=%d, context_len=%d, available_gpu_mem=%.2f GB",
            info.max_total_num_tokens,
            self.cfg.chunked_prefill_size,
            sc.max_prefill_tokens,
            sc.max_running_requests,
            info.context_len,
            info.available_gpu_mem_gb,
        )

    def ready_info(self) -> EngineReady:
        info = self.runner.info()
        return EngineReady(
            max_total_num_tokens=info.max_total_num_tokens,
            context_len=info.context_len,
            max_running_requests=self.scheduler.cfg.max_running_requests,
            dtype=info.dtype,
            device=info.device,
            attention_backend=info.attention_backend,
            vocab_size=self.model_cfg.vocab_size,
            page_size=self.cfg.page_size,
            instance_id=self.role.instance_id,
        )

    # ---- loop ---------------------------------------------------------------
    def run_forever(self) -> None:
        self._start_watchdog()
        self.conn.send_bytes(codec.encode(self.ready_info()))
        while self._receive():
            self.run_once()
        self.role.close()
        if self.followers is not None:
            self.followers.close()

    def run_once(self) -> None:
        """One turn of the loop once the front's messages are in: rooms,
        scheduling, one step, finished requests, outputs to the front."""
        self.pool.reclaim()
        self.role.poll()
        # What the role produced (a PD room's first token, a failed room) goes
        # out now, not one forward step later.
        self._flush()
        batch = self.scheduler.schedule()
        ran = self._step(batch) if batch is not None else None
        self._finish_done()
        self._flush()
        # After the flush: a prefill's first tokens leave before its log line is written.
        if ran is not None:
            self._log_step(ran)

    def _receive(self) -> bool:
        busy = self.scheduler.running or self.scheduler.waiting or self.scheduler.chunked
        if not busy:  # nobody will take an ahead step now; let its fenced pages go
            self.runner.drop_ahead()
            self.pool.reclaim()
        wait_s = 0.0 if busy else (self.pd_poll_wait_s if self.role.has_pending() else self.role.idle_wait_s)
        try:
            ready = self._wait_for_front(wait_s)
            while ready:  # also ready at end of file: recv_bytes raises
                self._handle(codec.decode(self.conn.recv_bytes()))
                ready = bool(self._inbox.poll(0))
        except (EOFError, OSError):
            logger.info("front closed the pipe; engine exits")
            return False
        return True

    def _wait_for_front(self, wait_s: float) -> bool:
        """Whether the front sent something within ``wait_s``: a blocking wait, or
        with ``spin_while_idle`` a poll that the message ends within microseconds."""
        if not self.spin_while_idle or wait_s <= 0:
            return bool(self._inbox.poll(wait_s * 1e3))
        deadline_s = time.monotonic() + wait_s
        while not self._inbox.poll(0):
            if time.monotonic() >= deadline_s:
                return False
        return True

    def _handle(self, msg: object) -> None:
        if isinstance(msg, GenerateRequest):
            self._admit(msg)
        elif isinstance(msg, AbortRequest):
            self.abort(msg.rid, msg.reason)
        elif isinstance(msg, ControlRequest):
            self.conn.send_bytes(codec.encode(self._control(msg)))
        else:
            logger.warning("engine ignores unexpected message %r", type(msg).__name__)

    def _admit(self, msg: GenerateRequest) -> None:
        req = Req(msg.rid, list(msg.input_ids), msg.params, room=msg.bootstrap_room, prefill_instance_id=msg.prefill_instance_id)
        try:
            self._check_admissible(req)
        except RequestRejected as exc:
            self.batch.outputs.append(TokenOutput(rid=req.rid, token_ids=[], finish_reason="abort", error=str(exc), error_status=exc.status))
            return
        self.role.admit(req)

    def _check_admissible(self, req: Req) -> None:
        limit = self.cfg.max_queued_requests
        if limit is not None and len(self.scheduler.waiting) >= limit:
            raise RequestRejected(f"too many queued requests (max_queued_requests={limit})", 503)
        capacity = self.pool.num_pages * self.pool.page_size
        if len(req.prompt_ids) + 1 > capacity:
            raise RequestRejected(f"prompt of {len(req.prompt_ids)} tokens exceeds the KV pool ({capacity} tokens)")

    # ---- one step -------------------------------------------------------------
    def _step(self, batch: ScheduledBatch) -> ScheduledBatch:
        """Run ``batch`` (or the part of it an ahead step computed, which it returns)."""
        self._step_started_s = now = time.monotonic()
        for req in batch.reqs:
            if req.scheduled_s is None:
                req.scheduled_s = now
        logits, batch = self._forward(batch)
        ready = self.scheduler.advance(batch)
        # Before sampling waits for the GPU: a prefill instance posts the pages
        # this forward writes now, so a stream-ordered copy leaves with the
        # forward's last kernel instead of after the host has seen the logits.
        self.role.after_step(batch)
        if ready:
            pending = self.sampler.sample_async(
                self._ready_logits(batch, ready, logits), [r.params for r in ready], Histories(ready))
            if batch.is_decode:
                self._launch_ahead(ready, pending.token_ids)
            self._record(ready, pending.wait())
        self._step_started_s = None
        return batch

    def _forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, ScheduledBatch]:
        """Logits of ``batch``, or of the part of it an ahead step already computed.
        Requests the ahead step did not include (joined since) wait one step:
        the next ahead step includes them."""
        taken = self.runner.take_ahead(batch)
        if taken is None:
            return self.runner.forward(batch), batch
        positions, logits = taken
        if len(positions) < len(batch.reqs):
            batch = ScheduledBatch(True, [batch.reqs[j] for j in positions], [batch.chunks[j] for j in positions],
                                   [batch.starts[j] for j in positions])
        return logits, batch

    def _ready_logits(self, batch: ScheduledBatch, ready: list[Req], logits: torch.Tensor) -> torch.Tensor:
        if len(ready) == len(batch.reqs):  # every row, in order (always so in decode)
            return logits[:, : self.num_text_tokens]
        index = {id(r): i for i, r in enumerate(batch.reqs)}
        rows = to_device(torch.tensor([index[id(r)] for r in ready]), logits.device)
        return logits[rows, : self.num_text_tokens]

    def _launch_ahead(self, sampled: list[Req], tokens: torch.Tensor) -> None:
        """Overlap schedule: enqueue the next decode step of every running
        request before this step's tokens reach the host. Requests sampled
        now feed their token from ``tokens`` on the device; those that joined
        since the batch was formed feed their last token from here."""
        if not self.runner.lookahead:
            return
        running = self.scheduler.running
        if len(sampled) == len(running) and all(map(operator.is_, sampled, running)):
            rows = range(len(running))  # the common step: every running request was sampled, in order
        else:
            rows = map(dict(zip(map(id, sampled), range(len(sampled)))).get, map(id, running))
        reserve, page_size, context_len = self.scheduler.reserve, self.cfg.page_size, self.runner.context_len
        reqs, chunks, starts, src = [], [], [], []
        # One loop of plain attributes and no calls but at page borders: it
        # runs for every request every step, before the host sees the tokens.
        for req, i in zip(running, rows):
            if req.finish_reason is not None:
                continue
            out = req.output_ids
            seq_len = len(req.prompt_ids) + len(out)
            if i is None:  # joined since: feeds its newest token from here, if that is all it needs
                if seq_len - req.num_computed != 1:
                    continue
                feed, start = [out[-1] if out else req.prompt_ids[-1]], seq_len - 1
            else:  # its token, still on the device, lands at position seq_len
                if len(out) + 1 >= req.params.max_new_tokens or seq_len + 1 >= context_len:
                    continue  # the token being sampled ends it, whatever it is
                feed, start = _ON_DEVICE, seq_len
            if len(req.pages) * page_size <= start and not reserve(req, start + 1):
                return  # the pool is short: the scheduler decides who goes, with the tokens known
            reqs.append(req)
            chunks.append(feed)
            starts.append(start)
            src.append(-1 if i is None else i)
        if reqs:
            self.runner.launch_ahead(reqs, chunks, starts, np.asarray(src, dtype=np.int64), tokens)

    def _record(self, reqs: list[Req], result: SampleResult) -> None:
        """Append each request's sampled token and mark those it ends.
        ``check_finish``'s rule, inlined: this runs for every request every step."""
        now = time.monotonic()
        if result.logprobs is not None:
            for req, lp, top in zip(reqs, result.logprobs, result.top_logprobs):
                req.logprobs.append(lp)
                req.top_logprobs.append(top)
        eos_ids, context_len = self.eos_ids, self.runner.context_len
        for req, token in zip(reqs, result.token_ids):
            out = req.output_ids
            out.append(token)
            if not req.first_token_s:
                req.first_token_s = now
            req.last_token_s = now
            p = req.params
            if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
                req.finish_reason, req.matched_stop = "stop", token
            elif len(out) >= p.max_new_tokens or len(req.prompt_ids) + len(out) >= context_len:
                req.finish_reason = "length"
        self.num_generated_tokens += len(reqs)

    def check_finish(self, req: Req, token: int) -> None:
        """Mark ``req`` finished if ``token`` (just appended) ends it."""
        p = req.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            req.finish_reason, req.matched_stop = "stop", token
        elif len(req.output_ids) >= p.max_new_tokens or req.seq_len >= self.runner.context_len:
            req.finish_reason = "length"

    def _finish_done(self) -> None:
        for req in self.scheduler.pop_finished():
            if not self.role.on_finished(req):
                self.scheduler.release(req)
                self.emit(req)
        self._emit_running()

    def _emit_running(self) -> None:
        """``emit`` of every running request, its common case inlined: new
        tokens due, nothing else to say (the rest goes through ``emit``)."""
        interval = self.cfg.stream_interval
        rids, token_ids = self.batch.rids, self.batch.token_ids
        for req in self.scheduler.running:
            sent, out = req.num_sent, req.output_ids
            if sent and len(out) - sent >= interval and not req.params.logprobs:
                rids.append(req.rid)
                token_ids.append(out[sent:])
                req.num_sent = len(out)
            elif len(out) > sent:
                self.emit(req)

    # ---- outputs --------------------------------------------------------------
    def emit(self, req: Req, error: str | None = None, error_status: int | None = None,
             error_code: str | None = None) -> None:
        """Queue the tokens the front has not seen yet (every stream_interval tokens)."""
        new = len(req.output_ids) - req.num_sent
        due = req.finished or error or req.num_sent == 0 or new >= self.cfg.stream_interval
        if (new <= 0 and not req.finished and not error) or not due:
            return
        start = req.num_sent
        req.num_sent = len(req.output_ids)
        want_lp = req.params.logprobs
        if start and not want_lp and not req.finished and error is None:
            self.batch.rids.append(req.rid)  # the common case: new tokens, nothing else
            self.batch.token_ids.append(req.output_ids[start:])
            return
        self.batch.outputs.append(
            TokenOutput(
                rid=req.rid,
                token_ids=req.output_ids[start:],
                logprobs=req.logprobs[start:] if want_lp else None,
                top_logprobs=[[list(t) for t in tl] for tl in req.top_logprobs[start:]] if want_lp else None,
                finish_reason=req.finish_reason,
                matched_stop=req.matched_stop,
                prompt_tokens=len(req.prompt_ids),
                cached_tokens=req.num_cached_tokens,
                error=error,
                error_status=error_status,
                error_code=error_code,
                timing=self.role.timing(req, time.monotonic()) if req.finished and error is None else None,
            )
        )

    def fail(self, req: Req, error: str, status: int = 500, code: str | None = None) -> None:
        req.finish_reason = "abort"
        self.emit(req, error=error, error_status=status, error_code=code)

    def _flush(self) -> None:
        if self.batch.outputs or self.batch.rids:
            self.conn.send_bytes(codec.encode(self.batch))
            self.batch = TokenBatch()

    def abort(self, rid: str, reason: str = "abort") -> None:
        # The role first: a PD room must end on both sides, not just leave the scheduler.
        req = self.role.abort(rid)
        if req is None:
            req = self.scheduler.remove(rid)
            if req is not None:
                self.scheduler.release(req, cache=False)
        if req is not None:
            req.finish_reason = "abort"
            self.emit(req)

    # ---- control ----------------------------------------------------------------
    def _control(self, msg: ControlRequest) -> ControlResponse:
        if msg.kind is ControlKind.STATS:
            return ControlResponse(req_id=msg.req_id, ok=True, stats=self.stats())
        if msg.kind is ControlKind.FLUSH_CACHE:
            if self.scheduler.num_live:
                return ControlResponse(req_id=msg.req_id, ok=False, message="cannot flush the cache while requests are running")
            self.cache.reset()
            return ControlResponse(req_id=msg.req_id, ok=True)
        return ControlResponse(req_id=msg.req_id, ok=False, message=f"unknown control request {msg.kind.value!r}")

    def stats(self) -> EngineStats:
        pool = self.pool
        return EngineStats(
            pid=os.getpid(),
            rank_pids=self.rank_pids,
            num_running_reqs=len(self.scheduler.running),
            num_queued_reqs=len(self.scheduler.waiting) + (self.scheduler.chunked is not None),
            num_generated_tokens=self.num_generated_tokens,
            num_retracted_reqs=self.scheduler.num_retracted_total,
            token_usage=round(self._token_usage(), 4),
            kv_pool=KVPoolStats(
                page_size=pool.page_size, total_pages=pool.num_pages, free_pages=pool.num_free_pages,
                parked_pages=pool.num_parked_pages, cached_pages=self.cache.num_cached_pages,
                used_pages=len(self.scheduler.live_pages() | self.role_held_pages()),
                bytes_per_page=pool.layout.page_bytes * pool.layout.num_regions,
            ),
            role=self.role.stats(),
        )

    def role_held_pages(self) -> set[int]:
        return self.role.held_pages()

    def _token_usage(self) -> float:
        total = self.pool.num_pages
        return (total - self.pool.num_free_pages - self.cache.num_cached_pages) / max(total, 1)

    # ---- logs and watchdog ------------------------------------------------------------
    def _log_step(self, batch: ScheduledBatch) -> None:
        if batch.is_decode:
            self._log_decode(batch)
        else:
            self._log_prefill(batch)

    def _log_prefill(self, batch: ScheduledBatch) -> None:
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, #running-req: %d, #queue-req: %d,",
            len(batch.reqs),
            batch.num_tokens,
            sum(s for s, r in zip(batch.starts, batch.reqs) if s == r.num_cached_tokens),  # first chunks only
            self._token_usage(),
            len(self.scheduler.running),
            len(self.scheduler.waiting),
        )

    def _log_decode(self, batch: ScheduledBatch) -> None:
        self.num_decode_steps += 1
        if self.num_decode_steps % self.cfg.decode_log_interval:
            return
        start_s, start_tokens = self._log_window
        now = time.monotonic()
        throughput = (self.num_generated_tokens - start_tokens) / max(now - start_s, 1e-9)
        self._log_window = (now, self.num_generated_tokens)
        num_tokens = sum(r.seq_len for r in self.scheduler.running)
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, cuda graph: %s, gen throughput (token/s): %.2f, #queue-req: %d,",
            len(batch.reqs),
            num_tokens,
            self._token_usage(),
            self.runner.uses_cuda_graph,
            throughput,
            len(self.scheduler.waiting),
        )

    def _start_watchdog(self) -> None:
        def watch() -> None:
            while True:
                time.sleep(min(self.cfg.watchdog_timeout / 4, 5.0))
                started = self._step_started_s
                if started is not None and time.monotonic() - started > self.cfg.watchdog_timeout:
                    logger.error("engine step exceeded --watchdog-timeout %.0fs; exiting", self.cfg.watchdog_timeout)
                    os._exit(1)

        threading.Thread(target=watch, name="watchdog", daemon=True).start()


def engine_main(cfg: ServerConfig, model_dir: str, conn: Connection, num_text_tokens: int | None = None,
                rank: int = 0, links: tuple = (), *, role: type[EngineRole]) -> None:
    """Entry point of an engine process. Rank 0 talks to the front on ``conn``
    and leads the other ranks through ``links`` ((step pipe, liveness pipe)
    per follower); a follower (rank > 0) gets rank 0's step pipe as ``conn``
    and holds ``links`` (its liveness pipe) open until it exits. ``role``: the
    instance's role class (``serve.py`` picks it by ``--disaggregation-mode``)."""
    name = "engine" if rank == 0 else f"engine rank {rank}"
    logging.basicConfig(level=cfg.log_level.upper(), format=f"[%(asctime)s {name}] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if cfg.tp_size > 1 and cfg.device != "cuda":  # the ranks share the host's cores
        torch.set_num_threads(max(torch.get_num_threads() // cfg.tp_size, 1))
    if rank > 0:
        _follower_main(cfg, model_dir, conn, rank, role)
        return
    try:
        followers = Followers([RankLink(c, a) for c, a in links]) if links else None
        engine = Engine(cfg, model_dir, conn, num_text_tokens, followers, role)
    except StartupError as exc:  # the operator's to fix (e.g. a P/D layout mismatch): one line
        logger.error("engine failed to start: %s", one_line(str(exc)))
        conn.send_bytes(codec.encode(EngineFailed(error=one_line(str(exc)))))
        return
    except Exception as exc:
        logger.exception("engine failed to start")
        conn.send_bytes(codec.encode(EngineFailed(error=f"{type(exc).__name__}: {exc}")))
        return
    engine.run_forever()


def _follower_main(cfg: ServerConfig, model_dir: str, conn: Connection, rank: int, role: type[EngineRole]) -> None:
    """A follower rank: its shard of the model (and of the KV transfer in PD), driven by rank 0."""
    try:
        runner = ModelRunner(cfg, model_dir, ModelConfig.from_dir(model_dir), rank)
        transfer = role.follower_transfer(cfg, runner.pool.buffer, runner.layout, rank)
        conn.send_bytes(codec.encode(RankHello(pid=os.getpid())))
        follow(runner, conn, transfer)
    except Exception:  # a failed collective or a broken pipe: rank 0 sees this rank die
        logger.exception("rank %d failed", rank)
        logging.shutdown()
        os._exit(1)
    if transfer is not None:
        transfer.close()
