"""A transfer agent in its own process, driven over a pipe.

Used by the conformance tests and the transfer microbenchmark: each side of a
PD pair must be a separate process (separate address space, separate UCX
context), just like real prefill and decode instances.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from pdserve.common.kv_layout import KVLayout

_POLL_SLEEP_S = 50e-6  # between polls while waiting; keeps a core free for the peer


@dataclass(frozen=True)
class WorkerSpec:
    backend: str
    instance_name: str
    layout: dict  # KVLayout.to_dict()
    timeout_s: float = 30.0
    device: str = "cpu"


class Command(str, Enum):
    """What a parent may ask its agent process (:data:`_COMMANDS` runs each)."""

    INFO = "info"
    ADD_PEER = "add_peer"
    REMOVE_PEER = "remove_peer"
    FILL = "fill"
    READ = "read"
    PAGE_SUMS = "page_sums"
    OPEN_SENDER = "open_sender"
    OPEN_RECEIVER = "open_receiver"
    SEND = "send"
    ABORT = "abort"
    WAIT = "wait"
    POLL = "poll"
    QUIESCENT = "quiescent"
    WAIT_QUIESCENT = "wait_quiescent"
    FAILURE = "failure"
    COUNTERS = "counters"
    IPC_COPIES = "ipc_copies"
    RING_NOTICES = "ring_notices"
    STATS = "stats"
    COPY_BANDWIDTH = "copy_bandwidth"
    EXIT = "exit"


class _Worker:
    """Lives in the child process and runs the commands."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch
        from pdserve.transfer.base import KVMemory, TransferConfig, create_transfer_agent

        self.layout = KVLayout.from_dict(spec.layout)
        dtype = getattr(torch, self.layout.dtype)
        numel = self.layout.total_bytes // self.layout.itemsize
        self.buffer = torch.zeros(numel, dtype=dtype, device=spec.device)
        config = TransferConfig(backend=spec.backend, instance_name=spec.instance_name, timeout_s=spec.timeout_s)
        self.agent = create_transfer_agent(config, KVMemory.from_tensor(self.buffer, self.layout))
        self.rooms: dict[int, Any] = {}

    def pages(self):
        """The buffer as [region, page, elements]."""
        return self.buffer.view(self.layout.num_regions, self.layout.num_pages, -1)

    def info(self) -> bytes:
        return self.agent.peer_info()

    def add_peer(self, info: bytes) -> str:
        return self.agent.add_peer(info)

    def remove_peer(self, peer: str) -> None:
        self.agent.remove_peer(peer)

    def fill(self, sentinel: float | None = None) -> None:
        """Sentinel everywhere, or value ``region * 1000 + page + 1`` per page."""
        import torch

        if sentinel is not None:
            self.buffer.fill_(sentinel)
            return
        r, p = self.layout.num_regions, self.layout.num_pages
        values = torch.arange(r).view(r, 1) * 1000 + torch.arange(p).view(1, p) + 1
        self.pages().copy_(values.unsqueeze(-1).to(self.buffer.dtype).expand_as(self.pages()))

    def read(self):
        return self.pages().float().cpu().numpy()

    def page_sums(self, pages: list[int]):
        """Per (region, page) float64 sums: a cheap fingerprint of page contents."""
        return self.pages()[:, pages].double().sum(dim=-1).cpu().numpy()

    def open_sender(self, room: int, peer: str, dst_pages: list[int], timeout_s: float | None = None) -> None:
        self.rooms[room] = self.agent.create_sender(room, peer, dst_pages, timeout_s)

    def open_receiver(self, room: int, peer: str, timeout_s: float | None = None) -> None:
        self.rooms[room] = self.agent.create_receiver(room, peer, timeout_s)

    def send(self, room: int, src_pages: list[int], dst_start: int, is_last: bool) -> float:
        start = time.monotonic()
        self.rooms[room].send(src_pages, dst_start, is_last)
        return start

    def abort(self, room: int) -> None:
        self.rooms[room].abort()

    def wait(self, rooms: list[int], timeout_s: float, progress: bool = True) -> dict[int, tuple[int, float]]:
        """Poll until every room is terminal; (state, monotonic time it got there).

        ``progress=False`` drives the agent the way an engine does: one
        ``agent.progress()`` per round, then ``poll(progress=False)`` per room."""
        done: dict[int, tuple[int, float]] = {}
        deadline = time.monotonic() + timeout_s
        while len(done) < len(rooms) and time.monotonic() < deadline:
            if not progress:
                self.agent.progress()
            for room in rooms:
                if room not in done:
                    state = self.rooms[room].poll(progress=progress)
                    if state.is_terminal:
                        done[room] = (int(state), time.monotonic())
            time.sleep(_POLL_SLEEP_S)
        for room in rooms:
            done.setdefault(room, (int(self.rooms[room].poll()), time.monotonic()))
        return done

    def poll(self, room: int, progress: bool = True) -> int:
        return int(self.rooms[room].poll(progress=progress))

    def quiescent(self, room: int) -> bool:
        return self.rooms[room].quiescent()

    def wait_quiescent(self, room: int, timeout_s: float) -> float | None:
        """Drive the agent until the room is quiescent; seconds it took, or None."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            self.agent.progress()
            if self.rooms[room].quiescent():
                return time.monotonic() - start
            time.sleep(_POLL_SLEEP_S)
        return None

    def failure(self, room: int) -> str | None:
        return self.rooms[room].failure

    def counters(self, room: int) -> tuple[int, int]:
        sender = self.rooms[room]
        return sender.num_descriptors, sender.num_bytes

    def ipc_copies(self, room: int) -> int:
        """Chunks a cuda_ipc sender copied itself rather than handing to NIXL."""
        return self.rooms[room].num_ipc_copies

    def ring_notices(self, room: int) -> int:
        """Chunk notices a cuda_ipc sender's copy stream wrote into the peer's ring."""
        return self.rooms[room].num_ring_notices

    def stats(self) -> dict:
        self.agent.progress()
        return asdict(self.agent.stats())

    def copy_bandwidth(self, num_bytes: int, repeats: int = 5) -> float:
        """Best bytes/s of a same-device copy of ``num_bytes`` (the local ceiling):
        device-to-device on cuda, a single-threaded memcpy on cpu."""
        import numpy as np
        import torch

        if self.buffer.is_cuda:
            src = torch.ones(num_bytes, dtype=torch.uint8, device=self.buffer.device)
            dst = torch.ones_like(src)
            copy, sync = dst.copy_, torch.cuda.synchronize
        else:  # numpy: torch's CPU copy spins threads that fight the peer process
            src, dst = np.ones(num_bytes, dtype=np.uint8), np.ones(num_bytes, dtype=np.uint8)
            copy, sync = (lambda s: np.copyto(dst, s)), (lambda: None)
        best = float("inf")
        for _ in range(repeats + 1):
            sync()
            start = time.perf_counter()
            copy(src)
            sync()
            best = min(best, time.perf_counter() - start)
        return num_bytes / best

    def close(self) -> None:
        self.agent.close()


_COMMANDS: dict[Command, Callable[..., Any]] = {
    Command.INFO: _Worker.info,
    Command.ADD_PEER: _Worker.add_peer,
    Command.REMOVE_PEER: _Worker.remove_peer,
    Command.FILL: _Worker.fill,
    Command.READ: _Worker.read,
    Command.PAGE_SUMS: _Worker.page_sums,
    Command.OPEN_SENDER: _Worker.open_sender,
    Command.OPEN_RECEIVER: _Worker.open_receiver,
    Command.SEND: _Worker.send,
    Command.ABORT: _Worker.abort,
    Command.WAIT: _Worker.wait,
    Command.POLL: _Worker.poll,
    Command.QUIESCENT: _Worker.quiescent,
    Command.WAIT_QUIESCENT: _Worker.wait_quiescent,
    Command.FAILURE: _Worker.failure,
    Command.COUNTERS: _Worker.counters,
    Command.IPC_COPIES: _Worker.ipc_copies,
    Command.RING_NOTICES: _Worker.ring_notices,
    Command.STATS: _Worker.stats,
    Command.COPY_BANDWIDTH: _Worker.copy_bandwidth,
    Command.EXIT: _Worker.close,
}


def _worker_main(conn, spec: WorkerSpec) -> None:
    try:
        worker = _Worker(spec)
    except Exception as exc:  # report, do not hang the parent
        conn.send(("err", RuntimeError(f"worker start failed: {exc!r}")))
        return
    conn.send(("ok", None))
    while True:
        command, kwargs = conn.recv()
        try:
            reply = ("ok", _COMMANDS[command](worker, **kwargs))
        except Exception as exc:  # sent back and re-raised in the parent
            reply = ("err", exc)
        try:
            conn.send(reply)
        except Exception as exc:  # an unpicklable exception
            conn.send(("err", RuntimeError(repr(exc))))
        if command is Command.EXIT:
            return


class AgentProcess:
    """Parent-side handle of one agent process."""

    def __init__(self, spec: WorkerSpec) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.spec = spec
        self.process = ctx.Process(target=_worker_main, args=(child, spec), daemon=True)
        self.process.start()
        child.close()

    def wait_ready(self, timeout_s: float = 120.0) -> AgentProcess:
        self._reply(timeout_s)
        return self

    def call(self, command: Command | str, reply_timeout_s: float = 60.0, **kwargs: Any) -> Any:
        """Run a command (a ``Command`` or its value); a command's own
        ``timeout_s`` extends the reply wait."""
        self.submit(command, **kwargs)
        return self.result(reply_timeout_s + float(kwargs.get("timeout_s") or 0.0))

    def submit(self, command: Command | str, **kwargs: Any) -> None:
        self._conn.send((Command(command), kwargs))

    def result(self, timeout_s: float = 30.0) -> Any:
        return self._reply(timeout_s)

    def _reply(self, timeout_s: float) -> Any:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"{self.spec.instance_name}: no reply within {timeout_s}s")
        status, value = self._conn.recv()
        if status == "err":
            raise value
        return value

    def close(self, timeout_s: float = 10.0) -> None:
        try:
            if self.process.is_alive():
                self.call(Command.EXIT, reply_timeout_s=timeout_s)
        except Exception:  # already broken: fall through to kill
            pass
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout_s)
        self._conn.close()


def start_agents(specs: list[WorkerSpec], timeout_s: float = 120.0) -> list[AgentProcess]:
    """Start several agent processes in parallel; all or none."""
    procs = [AgentProcess(spec) for spec in specs]
    try:
        for proc in procs:
            proc.wait_ready(timeout_s)
    except BaseException:
        for proc in procs:
            proc.close(timeout_s=2.0)
        raise
    return procs
