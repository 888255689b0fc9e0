"""The KV transfer interface: one agent per instance, a sender per room on P, a
receiver per room on D.

An instance's whole KV pool is one contiguous buffer (:class:`KVMemory`) that
the agent registers once. A room (one request, a random 63-bit id) writes a list
of the prefill side's pages into the pages the decode side reserved for it, for
every (layer, K/V) region, possibly in several chunks; after the last chunk has
landed the decode side is notified.

Everything here is non-blocking and driven by ONE engine thread that polls each
step. Every wait has a deadline and ends in ``FAILED``; nothing can hang.

Polling: ``poll()`` first runs the agent's ``progress()`` (peers' news, expiry,
retiring finished backend work), then reads the room's state. An engine with
many rooms calls ``agent.progress()`` once per step and ``poll(progress=False)``
per room, which only reads what that ``progress()`` (or the backend's own
progress thread) gathered.

Quiescence: a room that ended early may still have bytes moving. Its pages may be
reused only once ``quiescent()`` is True on the side that owns them: the sender's
posted WRITEs can no longer touch either side's memory, the receiver's posted
receives can no longer land. ``quiescent()`` reads the state gathered by the last
``agent.progress()`` and becomes True on every path; where a backend cannot tell,
it waits a bounded grace (each backend documents how long).

Backends are named in ``TRANSFER_BACKENDS`` (lazy entries) and built with
:func:`create_transfer_agent`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar

from pdserve.common.kv_layout import KVLayout
from pdserve.common.registry import Registry

if TYPE_CHECKING:
    import torch


class RoomState(IntEnum):
    BOOTSTRAPPING = 0  # the peer is not known yet
    WAITING_FOR_INPUT = 1  # known peer, nothing posted / arrived yet
    TRANSFERRING = 2
    SUCCESS = 3
    FAILED = 4

    @property
    def is_terminal(self) -> bool:
        return self in (RoomState.SUCCESS, RoomState.FAILED)


class LayoutMismatchError(ValueError):
    """The two sides' KV pages differ (page size, dtype, layers, heads)."""


class TransferError(RuntimeError):
    """A backend operation failed; the room it belongs to is FAILED."""


@dataclass(frozen=True)
class TransferConfig:
    backend: str = "nixl"
    instance_name: str = "pdserve"
    host: str = "127.0.0.1"  # address peers use to reach this agent (ucx listener)
    port: int = 0  # listener port for backends that listen; 0 = ephemeral
    ib_device: str | None = None  # e.g. "mlx5_0:1"; None lets UCX choose
    timeout_s: float = 120.0  # a room that is not done by then is FAILED
    progress_delay_us: int = 200  # nixl progress-thread sleep between polls (0 spins a core)
    notice_ttl_s: float = 120.0  # how long news for unknown/finished rooms is kept


@dataclass(frozen=True)
class KVMemory:
    """The registered KV buffer: where it is and how its pages are laid out."""

    base_ptr: int
    num_bytes: int
    device: str  # "cpu" | "cuda"
    device_id: int
    layout: KVLayout
    # The tensor behind base_ptr, for backends that share it by handle (CUDA IPC).
    tensor: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.num_bytes < self.layout.total_bytes:
            raise ValueError(
                f"buffer of {self.num_bytes} bytes is smaller than the layout's "
                f"{self.layout.total_bytes} bytes"
            )

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, layout: KVLayout) -> KVMemory:
        if not tensor.is_contiguous():
            raise ValueError("the KV buffer must be one contiguous tensor")
        device = tensor.device.type
        return cls(
            base_ptr=tensor.data_ptr(),
            num_bytes=tensor.numel() * tensor.element_size(),
            device=device,
            device_id=(tensor.device.index or 0) if device == "cuda" else 0,
            layout=layout,
            tensor=tensor,
        )


@dataclass(frozen=True)
class AgentStats:
    """Counters for leak checks and metrics."""

    num_rooms: int  # senders/receivers not yet finished
    num_buffered_rooms: int  # rooms with notices but no sender/receiver yet
    num_inflight_requests: int  # backend requests/handles not yet released
    num_peers: int = 0  # peers loaded and not removed


def check_layouts(mine: KVLayout, theirs: KVLayout, my_name: str, peer_name: str) -> None:
    problem = mine.mismatch(theirs, self_name=my_name, other_name=peer_name)
    if problem is not None:
        raise LayoutMismatchError(problem)


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._end = time.monotonic() + timeout_s

    def expired(self) -> bool:
        return time.monotonic() > self._end

    def restart(self) -> None:
        self._end = time.monotonic() + self.timeout_s


class KVSender(ABC):
    """P side of one room. Subclasses implement ``_post``, ``_progress``, ``_cancel``."""

    def __init__(self, room: int, peer: str, dst_pages: list[int], timeout_s: float) -> None:
        self.room = room
        self.peer = peer
        self.dst_pages = list(dst_pages)
        self.num_descriptors = 0
        self.num_bytes = 0
        # Chunks the sender copied itself, and notices its copy stream wrote into
        # the peer's ring (cuda_ipc); every other sender leaves them at 0.
        self.num_ipc_copies = 0
        self.num_ring_notices = 0
        self.failure: str | None = None
        self._state = RoomState.WAITING_FOR_INPUT
        self._num_chunks = 0
        self._finished_posting = False
        self._deadline = _Deadline(timeout_s)

    def keep_alive(self) -> None:
        """The room still waits for this side's prefill: its deadline starts over."""
        if not self._state.is_terminal:
            self._deadline.restart()

    def send(self, src_pages: list[int], dst_start: int, is_last: bool) -> None:
        """Post a WRITE of ``src_pages`` into ``dst_pages[dst_start:...]``."""
        if self._finished_posting:
            raise TransferError(f"room {self.room}: send after the last chunk")
        if self._state.is_terminal:
            return  # already FAILED; poll() reports it
        dst = self.dst_pages[dst_start : dst_start + len(src_pages)]
        if dst_start < 0 or len(dst) != len(src_pages):
            raise ValueError(
                f"room {self.room}: chunk of {len(src_pages)} pages at {dst_start} "
                f"exceeds the {len(self.dst_pages)} destination pages"
            )
        self._finished_posting = is_last
        if not src_pages and not is_last:
            return
        try:
            self._post(list(src_pages), dst, self._num_chunks, is_last)
        except TransferError as exc:
            self._fail(str(exc))
            return
        self._num_chunks += 1
        self._state = RoomState.TRANSFERRING

    def poll(self, progress: bool = True) -> RoomState:
        """The room's state; ``progress=False`` skips the agent's ``progress()``."""
        if self._state.is_terminal:
            return self._state
        if progress:
            self._pump()
            if self._state.is_terminal:  # the peer aborted meanwhile
                return self._state
        try:
            done = self._progress()
        except TransferError as exc:
            self._fail(str(exc))
            return self._state
        if self._state.is_terminal:  # the peer aborted meanwhile
            return self._state
        if done and self._finished_posting:
            self._state = RoomState.SUCCESS
            self._finish()
        elif self._deadline.expired():
            self._fail(f"timed out after {self._deadline.timeout_s}s")
        return self._state

    def abort(self) -> None:
        """Cancel the room and tell the peer, if it is not finished yet."""
        if not self._state.is_terminal:
            self._fail("aborted")

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self._state = RoomState.FAILED
        self._cancel(reason)
        self._finish()

    def on_peer_abort(self, reason: str) -> None:
        """The peer gave the room up; stop without notifying it back."""
        if not self._state.is_terminal:
            self.failure = f"peer aborted: {reason}"
            self._state = RoomState.FAILED
            self._cancel(None)
            self._finish()

    @abstractmethod
    def _post(self, src: list[int], dst: list[int], chunk_index: int, is_last: bool) -> None:
        """Start the WRITE of one chunk; raise TransferError on failure."""

    @abstractmethod
    def quiescent(self) -> bool:
        """True when no WRITE this sender posted can still touch either side's
        memory (as of the last ``agent.progress()``); becomes True on every path."""

    @abstractmethod
    def _pump(self) -> None:
        """Run the agent's ``progress()``."""

    @abstractmethod
    def _progress(self) -> bool:
        """True when everything posted so far is complete (and notified), as of
        the last ``agent.progress()``; raise TransferError on failure."""

    @abstractmethod
    def _cancel(self, reason: str | None) -> None:
        """Release in-flight work; notify the peer when ``reason`` is given."""

    @abstractmethod
    def _finish(self) -> None:
        """The room reached a terminal state; forget it in the agent."""


class KVReceiver(ABC):
    """D side of one room: SUCCESS once every chunk has landed and P said done."""

    def __init__(self, room: int, peer: str, timeout_s: float) -> None:
        self.room = room
        self.peer = peer
        self.failure: str | None = None
        self._state = RoomState.WAITING_FOR_INPUT
        self._deadline = _Deadline(timeout_s)

    def keep_alive(self) -> None:
        """The peer says it still works on this room: its deadline starts over."""
        if not self._state.is_terminal:
            self._deadline.restart()

    def poll(self, progress: bool = True) -> RoomState:
        """The room's state; ``progress=False`` skips the agent's ``progress()``."""
        if self._state.is_terminal:
            return self._state
        if progress:
            self._pump()
        if not self._state.is_terminal:
            self._refresh()
        if not self._state.is_terminal and self._deadline.expired():
            self._fail(f"timed out after {self._deadline.timeout_s}s", notify=True)
        return self._state

    def abort(self) -> None:
        if not self._state.is_terminal:
            self._fail("aborted", notify=True)

    def _fail(self, reason: str, notify: bool) -> None:
        self.failure = reason
        self._state = RoomState.FAILED
        self._close(reason if notify else None)

    def _succeed(self) -> None:
        self._state = RoomState.SUCCESS
        self._close(None)

    @abstractmethod
    def quiescent(self) -> bool:
        """True when no receive posted into this room's pages can still land
        (as of the last ``agent.progress()``); becomes True on every path."""

    @abstractmethod
    def _pump(self) -> None:
        """Run the agent's ``progress()``."""

    @abstractmethod
    def _refresh(self) -> None:
        """Look at the news the agent gathered for this room; may call _succeed/_fail."""

    @abstractmethod
    def _close(self, abort_reason: str | None) -> None:
        """Forget the room in the agent; tell the peer when aborting."""


class TransferAgent(ABC):
    """One per instance: owns the backend agent and the registered KV buffer."""

    # What the backend needs to run (``pdserve check-env`` asks before it
    # builds one): the Python package of its native library, if any, and a GPU.
    native_package: ClassVar[str | None] = None
    needs_gpu: ClassVar[bool] = False

    def __init__(self, config: TransferConfig, memory: KVMemory) -> None:
        self.config = config
        self.memory = memory

    @property
    @abstractmethod
    def name(self) -> str:
        """This agent's unique name, as peers know it."""

    @abstractmethod
    def peer_info(self) -> bytes:
        """What a remote agent needs to write into / notify this one."""

    @abstractmethod
    def add_peer(self, peer_info: bytes) -> str:
        """Load a remote agent (idempotent); return its name.

        Raises LayoutMismatchError when the two KV layouts cannot pair."""

    @abstractmethod
    def remove_peer(self, name: str) -> None:
        """Forget a peer once none of its rooms is open or draining: what the
        backend holds for it (loaded metadata, endpoints, mapped memory) is
        let go. Unknown names are ignored; a later ``add_peer`` loads it anew."""

    @abstractmethod
    def create_sender(
        self, room: int, peer: str, dst_pages: list[int], timeout_s: float | None = None
    ) -> KVSender: ...

    @abstractmethod
    def create_receiver(self, room: int, peer: str, timeout_s: float | None = None) -> KVReceiver: ...

    @abstractmethod
    def progress(self) -> None:
        """Take in the peers' news and retire finished backend work.

        ``poll()`` does this unless called with ``progress=False``; an engine
        calls it once per step, which also releases work nobody polls any more
        (aborted rooms) and advances ``quiescent()``."""

    @abstractmethod
    def stats(self) -> AgentStats: ...

    @abstractmethod
    def close(self) -> None: ...

    def _timeout_s(self, timeout_s: float | None) -> float:
        return self.config.timeout_s if timeout_s is None else timeout_s


# Lazy entries: choosing one backend never pays for (or requires) another's native library.
TRANSFER_BACKENDS: Registry[type[TransferAgent]] = Registry("transfer backend", {
    "nixl": "pdserve.transfer.nixl_backend:NixlAgent",
    "ucx": "pdserve.transfer.ucx_backend:UcxAgent",
    "cuda_ipc": "pdserve.transfer.cuda_ipc_backend:CudaIpcAgent",
})


def create_transfer_agent(config: TransferConfig, memory: KVMemory) -> TransferAgent:
    return TRANSFER_BACKENDS.get(config.backend)(config, memory)
