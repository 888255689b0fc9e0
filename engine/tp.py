"""The ranks of a tensor-parallel instance: rank 0 leads, the others follow.

Rank 0 is the engine the front talks to: it owns the scheduler, the page
allocator, the prefix cache and the PD role. Before each forward step it sends
the step (:class:`RankStep`: the fed tokens, positions and page tables) to
every other rank over a pipe of typed messages; each follower runs the same
forward on its shard, and the collectives inside the model keep the ranks in
step. Followers only run the model (and, in PD, their part of the KV transfer,
``transfer/tp.py``): their pools mirror rank 0's page numbers, so a page
index means the same slots on every rank.

The step travels on a pipe, not in a collective: an idle follower waits on the
pipe as long as the instance is idle, while every collective has a timeout.

Failure: each follower holds the write end of a pipe nobody writes, rank 0 a
thread that waits on the read ends: a follower that dies closes its end, and
rank 0 exits at once, so the front sees the instance die (``/health`` 503,
every stream ends with an error, PD peers see the control channel close and
release their pages). A follower exits when rank 0's pipe closes, or when a
collective fails because a peer is gone.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Protocol

from pdserve.common import codec
from pdserve.common.codec import message
from pdserve.model.batch import ScheduledBatch

logger = logging.getLogger("pdserve.tp")


@message
@dataclass(frozen=True, kw_only=True)
class RankStep:
    """One forward step, as rank 0 runs it."""

    is_decode: bool
    chunks: list[list[int]]
    starts: list[int]
    pages: list[list[int]]  # each request's page table


@message
@dataclass(frozen=True, kw_only=True)
class RankHello:
    """A follower's first message: its shard is loaded, and it runs as process ``pid``."""

    pid: int


@message
@dataclass(frozen=True, kw_only=True)
class RankCall:
    """A call rank 0 makes on every rank's part of the KV transfer: ``call`` is
    one of the typed calls ``transfer/tp.py`` declares, which this module never
    looks into."""

    call: object
    reply: bool = False  # the caller waits for each rank's answer


class RankPart(Protocol):
    """A follower's part of the KV transfer, as its loop drives it."""

    def handle(self, call: object) -> object:
        """Run one of rank 0's calls; its answer (plain data or a message)."""

    def close(self) -> None: ...


@dataclass
class RankLink:
    """Rank 0's end of one follower: the step pipe and the pipe that closes when it dies."""

    conn: Connection
    alive: Connection


@dataclass
class _Paged:
    pages: list[int]


def step_of(batch: ScheduledBatch) -> RankStep:
    return RankStep(is_decode=batch.is_decode, chunks=batch.chunks, starts=batch.starts,
                    pages=[r.pages for r in batch.reqs])


def batch_of(step: RankStep) -> ScheduledBatch:
    return ScheduledBatch(step.is_decode, [_Paged(p) for p in step.pages], step.chunks, step.starts)


class Followers:
    """Rank 0's handle on the other ranks."""

    def __init__(self, links: list[RankLink]):
        self.links = links
        self._watch = threading.Thread(target=self._watch_deaths, name="rank-watch", daemon=True)

    def start_watch(self) -> None:
        self._watch.start()

    def send_step(self, batch: ScheduledBatch) -> None:
        self.broadcast(step_of(batch))

    def call(self, call: object, reply: bool = False) -> None:
        """Have every follower run ``call`` on its part of the KV transfer
        (``reply``: each answers; read the answers with ``gather``)."""
        self.broadcast(RankCall(call=call, reply=reply))

    def broadcast(self, msg: object) -> None:
        data = codec.encode(msg)
        for link in self.links:
            link.conn.send_bytes(data)

    def gather(self, timeout_s: float) -> list[object]:
        """One answer from each follower, in rank order; a follower that does
        not answer in time is taken for dead (the instance exits)."""
        answers = []
        for rank, link in enumerate(self.links, start=1):
            if not link.conn.poll(timeout_s):
                _exit(f"rank {rank} did not answer within {timeout_s:g}s")
            answers.append(codec.decode(link.conn.recv_bytes()))
        return answers

    def ready_pids(self, timeout_s: float) -> list[int]:
        """Each follower's process id, once it has loaded its shard."""
        pids = []
        for hello in self.gather(timeout_s):
            assert isinstance(hello, RankHello), hello
            pids.append(hello.pid)
        return pids

    def close(self) -> None:
        for link in self.links:
            link.conn.close()

    def _watch_deaths(self) -> None:
        alive = [link.alive for link in self.links]
        ready = wait(alive)  # nobody writes these: readable means closed
        rank = alive.index(ready[0]) + 1
        _exit(f"rank {rank} of this instance died")


def _exit(reason: str) -> None:
    logger.error("%s; the instance exits", reason)
    logging.shutdown()
    os._exit(1)


def follow(runner, conn: Connection, transfer: RankPart | None = None) -> None:
    """A follower's loop: run each step rank 0 sends until its pipe closes.
    ``transfer``: this rank's part of the KV transfer (PD roles), or None."""
    while True:
        try:
            msg = codec.decode(conn.recv_bytes())
        except (EOFError, OSError):
            logger.info("rank 0 closed the pipe; rank exits")
            return
        if isinstance(msg, RankStep):
            runner.forward(batch_of(msg))
        elif isinstance(msg, RankCall) and transfer is not None:
            answer = transfer.handle(msg.call)
            if msg.reply:
                conn.send_bytes(codec.encode(answer))
        else:
            logger.warning("rank ignores unexpected message %r", type(msg).__name__)
