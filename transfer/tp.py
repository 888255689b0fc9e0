"""The KV transfer of a tensor-parallel instance: every rank moves its own heads.

Each rank registers its own KV shard with its own backend agent
(:class:`RankTransfer`). Rank 0's roles see one :class:`TPAgent`, which
publishes every rank's agent info as one bundle (:class:`TPAgentInfo`) and
turns each room into a part per (P rank, D rank) pair that shares KV heads
(:func:`transfer_pairs`): the P rank writes exactly the shared heads of each
page into the D rank's pages (``descriptors.py``), under a room id of its own
(:func:`pair_room`), so the backends and their notices work as at TP 1.

Rank 0 drives the other ranks' parts through its followers' handle: each call
is a typed message (:class:`PartCall`) that travels in a ``RankCall`` on the
pipe that carries the steps (engine/tp.py); ``progress`` gathers each rank's
room states, and a room's state is the sum of its parts: FAILED if one
failed, SUCCESS once all succeeded, quiescent once all are. At TP 1 the
bundle holds one agent, the one pair is (0, 0) and its room is the room
itself, so nothing changes on the wire.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

from pdserve.common.codec import decode, encode, message
from pdserve.common.config import ServerConfig
from pdserve.common.kv_layout import KVLayout
from pdserve.transfer.base import (
    AgentStats,
    KVMemory,
    RoomState,
    TransferConfig,
    check_layouts,
    create_transfer_agent,
)
from pdserve.transfer.messages import AgentInfo, decode_as

logger = logging.getLogger("pdserve.transfer.tp")

_ROOM_MASK = (1 << 63) - 1
_PAIR_STRIDE = 0x9E3779B97F4A7C15  # odd: distinct pairs give distinct room ids


@message
@dataclass(frozen=True, kw_only=True)
class TPAgentInfo:
    """Every rank's agent info (``AgentInfo`` bytes), rank 0 first."""

    ranks: list[bytes] = field(default_factory=list)


def advertised_host(host: str) -> str:
    """A wildcard bind address is no address to give peers."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return host


def transfer_config(cfg: ServerConfig, rank: int, host: str) -> TransferConfig:
    name = cfg.instance_id if rank == 0 else f"{cfg.instance_id}-rank{rank}"
    return TransferConfig(backend=cfg.disaggregation_transfer_backend, instance_name=name, host=host,
                          ib_device=cfg.disaggregation_ib_device, timeout_s=cfg.disaggregation_timeout_s)


def pair_room(room: int, src_rank: int, dst_rank: int) -> int:
    """The room id one (P rank, D rank) pair uses; the room itself for (0, 0)."""
    return (room + (src_rank * 1024 + dst_rank) * _PAIR_STRIDE) & _ROOM_MASK


def _holds(layout: KVLayout, head: int) -> bool:
    return layout.head_start <= head < layout.head_start + layout.num_kv_heads


def transfer_pairs(src: list[KVLayout], dst: list[KVLayout]) -> list[tuple[int, int]]:
    """(P rank, D rank) pairs that move KV: for each head a D rank holds, one P
    rank that holds it (replicas take turns by D rank), so no byte is written twice."""
    pairs = set()
    for j, d in enumerate(dst):
        for head in range(d.head_start, d.head_start + d.num_kv_heads):
            holders = [i for i, s in enumerate(src) if _holds(s, head)]
            if not holders:
                raise ValueError(f"no prefill rank holds KV head {head}")
            pairs.add((holders[j % len(holders)], j))
    return sorted(pairs)


def _overlaps(a: KVLayout, b: KVLayout) -> bool:
    return max(a.head_start, b.head_start) < min(a.head_start + a.num_kv_heads, b.head_start + b.num_kv_heads)


# ---- what rank 0 asks of every rank's part ----------------------------------------------
class PartCall:
    """A call on one rank's part of the KV transfer, made by rank 0 on every
    rank: a typed message whose ``run`` is what the part does."""

    def run(self, part: RankTransfer) -> object:
        raise NotImplementedError


@message
@dataclass(frozen=True, kw_only=True)
class PartPeerInfo(PartCall):
    """Answers this rank's agent info."""

    def run(self, part: RankTransfer) -> bytes:
        return part.peer_info()


@message
@dataclass(frozen=True, kw_only=True)
class PartAddPeer(PartCall):
    """Answers why loading the peer failed, or None."""

    bundle: str
    plan: dict[int, dict[int, bytes]]  # rank -> remote rank -> its agent info

    def run(self, part: RankTransfer) -> str | None:
        return part.add_peer(self.bundle, self.plan)


@message
@dataclass(frozen=True, kw_only=True)
class PartRemovePeer(PartCall):
    bundle: str

    def run(self, part: RankTransfer) -> None:
        part.remove_peer(self.bundle)


@message
@dataclass(frozen=True, kw_only=True)
class PartOpen(PartCall):
    room: int
    bundle: str
    plan: dict[int, list[int]]  # rank -> the remote ranks it pairs with
    dst_pages: list[int] | None  # None: receivers
    timeout_s: float

    def run(self, part: RankTransfer) -> None:
        part.open(self.room, self.bundle, self.plan, self.dst_pages, self.timeout_s)


@message
@dataclass(frozen=True, kw_only=True)
class PartSend(PartCall):
    room: int
    src_pages: list[int]
    dst_start: int
    is_last: bool

    def run(self, part: RankTransfer) -> None:
        part.send(self.room, self.src_pages, self.dst_start, self.is_last)


@message
@dataclass(frozen=True, kw_only=True)
class PartAbort(PartCall):
    room: int

    def run(self, part: RankTransfer) -> None:
        part.abort(self.room)


@message
@dataclass(frozen=True, kw_only=True)
class PartKeepAlive(PartCall):
    room: int

    def run(self, part: RankTransfer) -> None:
        part.keep_alive(self.room)


@message
@dataclass(frozen=True, kw_only=True)
class PartPeerAbort(PartCall):
    room: int
    reason: str

    def run(self, part: RankTransfer) -> None:
        part.peer_abort(self.room, self.reason)


@message
@dataclass(frozen=True, kw_only=True)
class PartProgress(PartCall):
    """Answers each room's report (:meth:`RankTransfer.progress`)."""

    def run(self, part: RankTransfer) -> dict[int, list]:
        return part.progress()


@message
@dataclass(frozen=True, kw_only=True)
class PartStats(PartCall):
    def run(self, part: RankTransfer) -> list[int]:
        return part.stats()


# ---- one rank's part -----------------------------------------------------------------
class RankTransfer:
    """One rank's agent and its parts of the rooms; called by rank 0 (directly
    on rank 0, through :class:`PartCall` messages on the others). Answers are
    plain data (they cross the pipe)."""

    def __init__(self, config: TransferConfig, memory: KVMemory, rank: int):
        self.rank = rank
        self.agent = create_transfer_agent(config, memory)
        self.peers: dict[str, dict[int, str]] = {}  # bundle name -> remote rank -> agent name
        self.rooms: dict[int, list] = {}  # room -> this rank's senders or receivers
        self.failed: dict[int, str] = {}  # rooms whose part could not open here

    def handle(self, call: PartCall) -> object:
        return call.run(self)

    def peer_info(self) -> bytes:
        return self.agent.peer_info()

    def add_peer(self, bundle: str, plan: dict) -> str | None:
        """Load the remote ranks ``plan[rank]`` names (remote rank -> agent info);
        why that failed, or None."""
        names = self.peers.setdefault(bundle, {})
        try:
            for remote, info in (plan.get(self.rank) or {}).items():
                names[int(remote)] = self.agent.add_peer(info)
        except Exception as exc:  # an unreachable peer fails the pairing, not the rank
            return f"rank {self.rank}: {type(exc).__name__}: {exc}"
        return None

    def remove_peer(self, bundle: str) -> None:
        for name in self.peers.pop(bundle, {}).values():
            self.agent.remove_peer(name)

    def open(self, room: int, bundle: str, plan: dict, dst_pages: list[int] | None, timeout_s: float) -> None:
        """Open this rank's parts: senders to (``dst_pages`` given) or receivers
        from the remote ranks ``plan[rank]`` names."""
        remotes = plan.get(self.rank) or plan.get(str(self.rank)) or []
        if not remotes:
            return
        parts = self.rooms[room] = []
        try:
            for remote in remotes:
                name = self.peers[bundle][int(remote)]
                if dst_pages is None:
                    parts.append(self.agent.create_receiver(pair_room(room, remote, self.rank), name, timeout_s))
                else:
                    parts.append(self.agent.create_sender(pair_room(room, self.rank, remote), name, dst_pages, timeout_s))
        except Exception as exc:  # e.g. a room id the agent still remembers: this room fails, not the rank
            self.failed[room] = f"rank {self.rank}: {exc}"
            for part in parts:
                part.abort()

    def send(self, room: int, src_pages: list[int], dst_start: int, is_last: bool) -> None:
        for part in self.rooms.get(room, ()):
            part.send(src_pages, dst_start, is_last)

    def abort(self, room: int) -> None:
        for part in self.rooms.get(room, ()):
            part.abort()

    def keep_alive(self, room: int) -> None:
        for part in self.rooms.get(room, ()):
            part.keep_alive()

    def peer_abort(self, room: int, reason: str) -> None:
        for part in self.rooms.get(room, ()):
            part.on_peer_abort(reason)

    def progress(self) -> dict[int, list]:
        """Each room's [state, failure, quiescent] on this rank; rooms that are
        over and quiet are reported one last time, then forgotten."""
        self.agent.progress()
        report = {}
        for room, parts in list(self.rooms.items()):
            states = [part.poll(progress=False) for part in parts]
            failure = self.failed.pop(room, None) or next((p.failure for p in parts if p.failure), None)
            if failure is not None or RoomState.FAILED in states:
                state = RoomState.FAILED
            elif all(s == RoomState.SUCCESS for s in states):
                state = RoomState.SUCCESS
            elif any(s in (RoomState.TRANSFERRING, RoomState.SUCCESS) for s in states):
                state = RoomState.TRANSFERRING  # some parts landed, not all: not done
            else:
                state = RoomState.WAITING_FOR_INPUT
            quiet = state.is_terminal and all(p.quiescent() for p in parts)
            report[room] = [int(state), failure, quiet]
            if quiet:
                del self.rooms[room]
        return report

    def stats(self) -> list[int]:
        s = self.agent.stats()
        return [s.num_rooms, s.num_buffered_rooms, s.num_inflight_requests, s.num_peers]

    def close(self) -> None:
        self.agent.close()


def follower_transfer(cfg: ServerConfig, buffer, layout: KVLayout, rank: int) -> RankTransfer:
    """A follower rank's part of its instance's KV transfer."""
    host = advertised_host(cfg.disaggregation_control_host or cfg.host)
    return RankTransfer(transfer_config(cfg, rank, host), KVMemory.from_tensor(buffer, layout), rank)


# ---- rank 0's view --------------------------------------------------------------------
@dataclass
class _Peer:
    infos: list[AgentInfo]

    @property
    def layouts(self) -> list[KVLayout]:
        return [i.kv_layout for i in self.infos]


class _TPRoom:
    """A room as the roles see it, made of every rank's parts."""

    def __init__(self, agent: TPAgent, room: int, peer: str, ranks: list[int], timeout_s: float,
                 dst_pages: list[int] | None = None):
        self._agent = agent
        self.room = room
        self.peer = peer
        self.dst_pages = list(dst_pages or [])
        self.ranks = ranks  # the ranks with parts
        self.failure: str | None = None
        self._state = RoomState.WAITING_FOR_INPUT
        self._quiet = not ranks
        self._last: dict[int, list] = {}  # rank -> its part's last report
        self.num_descriptors = self.num_bytes = self.num_ipc_copies = self.num_ring_notices = 0

    def poll(self, progress: bool = True) -> RoomState:
        if progress:
            self._agent.progress()
        return self._state

    def quiescent(self) -> bool:
        return self._quiet or (self._state.is_terminal and not self.ranks)

    def abort(self) -> None:
        if not self._state.is_terminal:
            self._set(RoomState.FAILED, "aborted")
            self._agent.call(PartAbort(room=self.room))

    def on_peer_abort(self, reason: str) -> None:
        if not self._state.is_terminal:
            self._set(RoomState.FAILED, f"peer aborted: {reason}")
            self._agent.call(PartPeerAbort(room=self.room, reason=reason))

    def keep_alive(self) -> None:
        """Every rank's parts of the room start their deadlines over."""
        if not self._state.is_terminal and self.ranks:
            self._agent.call(PartKeepAlive(room=self.room))

    def _set(self, state: RoomState, failure: str | None = None) -> None:
        self._state = state
        self.failure = self.failure or failure

    def update(self, reports: dict[int, list]) -> None:
        """``reports``: rank -> [state, failure, quiescent] of this room's part
        there (a part reported over and quiet is not reported again)."""
        self._last.update(reports)
        reports = self._last
        states = [RoomState(reports[r][0]) for r in self.ranks if r in reports]
        failure = next((reports[r][1] for r in self.ranks if r in reports and reports[r][1]), None)
        if not self._state.is_terminal:
            if failure is not None or RoomState.FAILED in states:
                self._set(RoomState.FAILED, failure or "transfer failed")
                self._agent.call(PartAbort(room=self.room))  # the other parts stop too
            elif len(states) == len(self.ranks) and all(s == RoomState.SUCCESS for s in states):
                self._set(RoomState.SUCCESS)
            elif any(s == RoomState.TRANSFERRING for s in states):
                self._state = RoomState.TRANSFERRING
        self._quiet = all(reports.get(r, [0, None, False])[2] for r in self.ranks)


class TPSender(_TPRoom):
    def send(self, src_pages: list[int], dst_start: int, is_last: bool) -> None:
        if self._state.is_terminal:
            return
        self._agent.call(PartSend(room=self.room, src_pages=list(src_pages), dst_start=dst_start, is_last=is_last))


class TPAgent:
    """Rank 0's transfer agent: the ``TransferAgent`` interface over every rank's part."""

    def __init__(self, config: TransferConfig, memory: KVMemory, followers=None, timeout_s: float = 60.0):
        self.config = config
        self.memory = memory
        self.local = RankTransfer(config, memory, 0)
        self.followers = followers
        self.timeout_s = timeout_s
        infos = self._call_all(PartPeerInfo())
        self._infos = [decode_as(i, AgentInfo) for i in infos]
        self._bundle = encode(TPAgentInfo(ranks=infos))
        self._peers: dict[str, _Peer] = {}
        self._rooms: dict[int, _TPRoom] = {}

    @property
    def name(self) -> str:
        return self._infos[0].name

    @property
    def num_ranks(self) -> int:
        return len(self._infos)

    # ---- calls on every rank ----
    def call(self, call: PartCall) -> None:
        if self.followers:
            self.followers.call(call)
        self.local.handle(call)

    def _call_all(self, call: PartCall) -> list:
        """Every rank's answer, rank 0 first (the followers answer before rank 0 runs it)."""
        answers = []
        if self.followers:
            self.followers.call(call, reply=True)
            answers = self.followers.gather(self.timeout_s)
        return [self.local.handle(call)] + answers

    # ---- TransferAgent ----
    def peer_info(self) -> bytes:
        return self._bundle

    def add_peer(self, peer_info: bytes) -> str:
        msg = decode(peer_info)
        ranks = msg.ranks if isinstance(msg, TPAgentInfo) else [peer_info]
        peer = _Peer([decode_as(r, AgentInfo) for r in ranks])
        name = peer.infos[0].name
        if name in self._peers:
            return name
        check_layouts(self.memory.layout, peer.infos[0].kv_layout, self.name, name)  # raises LayoutMismatchError
        mine = [i.kv_layout for i in self._infos]
        # Each rank loads the remote ranks that share a head with it (either direction).
        plan = {r: {j: ranks[j] for j, theirs in enumerate(peer.layouts) if _overlaps(mine[r], theirs)}
                for r in range(self.num_ranks)}
        problems = [p for p in self._call_all(PartAddPeer(bundle=name, plan=plan)) if p]
        if problems:
            self.call(PartRemovePeer(bundle=name))
            raise ValueError("; ".join(problems))
        self._peers[name] = peer
        return name

    def remove_peer(self, name: str) -> None:
        if self._peers.pop(name, None) is not None:
            self.call(PartRemovePeer(bundle=name))

    def _plan(self, src: list[KVLayout], dst: list[KVLayout], side: int) -> dict[int, list[int]]:
        pairs = transfer_pairs(src, dst)
        plan: dict[int, list[int]] = {}
        for pair in pairs:
            plan.setdefault(pair[side], []).append(pair[1 - side])
        return plan

    def create_sender(self, room: int, peer: str, dst_pages: list[int], timeout_s: float | None = None) -> TPSender:
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        plan = self._plan([i.kv_layout for i in self._infos], self._peer(peer).layouts, 0)
        self.call(PartOpen(room=room, bundle=peer, plan=plan, dst_pages=list(dst_pages), timeout_s=timeout_s))
        return self._track(TPSender(self, room, peer, sorted(plan), timeout_s, dst_pages))

    def create_receiver(self, room: int, peer: str, timeout_s: float | None = None) -> _TPRoom:
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        plan = self._plan(self._peer(peer).layouts, [i.kv_layout for i in self._infos], 1)
        self.call(PartOpen(room=room, bundle=peer, plan=plan, dst_pages=None, timeout_s=timeout_s))
        return self._track(_TPRoom(self, room, peer, sorted(plan), timeout_s))

    def _peer(self, name: str) -> _Peer:
        try:
            return self._peers[name]
        except KeyError:
            raise KeyError(f"unknown transfer peer {name!r}; call add_peer first") from None

    def _track(self, room: _TPRoom) -> _TPRoom:
        self._rooms[room.room] = room
        return room

    def progress(self) -> None:
        reports = self._call_all(PartProgress())
        for key, room in list(self._rooms.items()):
            room.update({rank: r[key] for rank, r in enumerate(reports) if key in r or int(key) in r})
            if room.poll(progress=False).is_terminal and room.quiescent():
                del self._rooms[key]

    def stats(self) -> AgentStats:
        totals = [sum(col) for col in zip(*self._call_all(PartStats()))]
        return AgentStats(num_rooms=len(self._rooms), num_buffered_rooms=totals[1],
                          num_inflight_requests=totals[2], num_peers=len(self._peers))

    def close(self) -> None:
        self.local.close()  # the followers close theirs when rank 0's pipe closes
