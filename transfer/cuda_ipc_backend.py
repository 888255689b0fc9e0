"""Same-GPU data path: pages copied straight into the decode pool through CUDA IPC.

When a prefill and a decode instance share one GPU, this backend maps the
decode pool into the prefill process once and copies each chunk's pages on a
side stream: no UCX request per region, no UCX progress in the data path, and
a completion that is a CUDA event (so quiescence is exact). It is the NIXL
backend in every other respect: notices, aborts, CPU pools, and peers on
another GPU or host all go through NIXL, so choosing it never loses a pairing
the NIXL backend could make.

1. Each agent publishes, next to its NIXL metadata, its GPU's UUID and a CUDA
   IPC handle of its pool (torch's ``_share_cuda_`` of the pool's storage).
2. ``add_peer`` notes a peer that sits on the same physical GPU (same UUID);
   its pool is mapped at the first send. Other peers get NIXL WRITEs.
3. A chunk to a mapped peer: a side stream waits for the compute stream (the
   kernels that wrote the pages), then one strided copy per run of
   consecutive pages, or one page-copy kernel launch for scattered pages;
   an event is recorded after it.
4. The chunk's notice: the side stream writes it into the peer's notice ring
   (``notice_ring``: shared memory the decode agent reads on every poll)
   right after the copy, with one small kernel, so no host on the prefill
   side stands between the bytes landing and the decode side knowing.
   Without a ring (it could not be registered, or it is full) ``progress()``
   sends the notice over NIXL once the copy's event completed. Either way
   the decode side is the plain NIXL receiver counting chunk notices.
5. Quiescence is exact: a launched copy cannot be recalled, so an aborted room
   waits for its events, which complete on their own within microseconds.
6. ``remove_peer`` waits for the side stream before it unmaps the peer's pool
   and closes the rings shared with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from pdserve.common.codec import encode, message
from pdserve.common.kv_layout import KVLayout
from pdserve.transfer.base import KVMemory, TransferConfig
from pdserve.transfer.descriptors import PageRuns, check_pages, page_runs, whole_pages
from pdserve.transfer.messages import NOTICE_CHUNK, AgentInfo, RingOffer, RoomNotice, decode_as
from pdserve.transfer.nixl_backend import NixlAgent, NixlSender
from pdserve.transfer.notice_ring import RingReader, RingWriter

logger = logging.getLogger("pdserve.transfer.cuda_ipc")

_MAX_STRIDED_RUNS = 4  # more runs than this go to the one-launch page-copy kernel


@message
@dataclass(frozen=True, kw_only=True)
class CudaIpcMetadata:
    nixl: bytes  # the NIXL agent metadata
    gpu_uuid: str = ""  # "" when the pool is not on a GPU
    storage: list = field(default_factory=list)  # torch's _share_cuda_() of the pool's storage
    offset_bytes: int = 0  # where the pool starts in that storage


def gpu_uuid(device_index: int) -> str:
    return str(torch.cuda.get_device_properties(device_index).uuid)


def _word_dtype(page_bytes: int) -> torch.dtype:
    """The widest integer that divides a page: the copy moves words, not bf16 values."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        if page_bytes % dtype.itemsize == 0:
            return dtype
    return torch.uint8


def copy_runs(src: torch.Tensor, dst: torch.Tensor, runs: PageRuns) -> None:
    """Copy each run of pages, every region at once: ``src``/``dst`` are
    [regions, pages, words] views of the two pools."""
    for s, d, n in zip(runs.src_starts.tolist(), runs.dst_starts.tolist(), runs.lengths.tolist()):
        dst[:, d : d + n].copy_(src[:, s : s + n])


class _MappedPool:
    """A peer's pool opened in this process: a flat tensor over its bytes."""

    def __init__(self, meta: CudaIpcMetadata, device_index: int, num_bytes: int, dtype: torch.dtype) -> None:
        args = list(meta.storage)
        args[0] = device_index  # the peer's index may differ from ours for the same GPU
        storage = torch.UntypedStorage._new_shared_cuda(*args)
        flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{device_index}")
        flat.set_(storage, meta.offset_bytes, (num_bytes,))
        self.words = flat.view(dtype)


class CudaIpcSender(NixlSender):
    """Chunks to a mapped peer are copies with an event; others are NIXL WRITEs."""

    _agent: CudaIpcAgent

    def __init__(self, agent: CudaIpcAgent, room: int, peer: str, dst_pages: list[int], timeout_s: float):
        super().__init__(agent, room, peer, dst_pages, timeout_s)
        # Landed once the event completes; the notice is None when the ring carries it.
        self._copies: list[tuple[torch.cuda.Event, RoomNotice | None]] = []
        self._abandoned: list[torch.cuda.Event] = []  # copies of an aborted room, still running

    def _post(self, src: list[int], dst: list[int], chunk_index: int, is_last: bool) -> None:
        pool = self._agent.mapped(self.peer)
        if pool is None or not whole_pages(self._agent.memory.layout, self._agent.peer(self.peer).kv_layout):
            # Another GPU, or a slice of each page's heads (tensor parallelism):
            # NIXL's descriptors carry what the page-copy kernel does not.
            super()._post(src, dst, chunk_index, is_last)
            return
        notice = RoomNotice(room=self.room, kind=NOTICE_CHUNK, sender=self._agent.name, chunk_index=chunk_index, is_last=is_last)
        # No descriptor arrays here: the copy needs only the runs, and this is
        # host time on the engine thread before the bytes start moving.
        mine, theirs = self._agent.memory.layout, self._agent.peer(self.peer).kv_layout
        runs = page_runs(src, dst)
        check_pages(runs, mine, theirs)
        if not len(runs):
            self._agent.notify(self.peer, notice)
            return
        event, in_ring = self._agent.copy(runs, src, dst, theirs, self.peer, pool, notice)
        self._copies.append((event, None if in_ring else notice))
        self.num_ipc_copies += 1
        self.num_ring_notices += in_ring
        self.num_descriptors += len(runs) * mine.num_regions  # what NIXL would have posted
        self.num_bytes += len(src) * mine.page_bytes * mine.num_regions

    def collect(self) -> None:
        super().collect()
        while self._copies and self._copies[0][0].query():
            _, notice = self._copies.pop(0)
            if notice is not None:
                self._agent.notify(self.peer, notice)

    def _progress(self) -> bool:
        return super()._progress() and not self._copies

    def _release(self) -> None:
        super()._release()
        self._abandoned.extend(event for event, _ in self._copies)
        self._copies = []

    def quiescent(self) -> bool:
        self._abandoned = [e for e in self._abandoned if not e.query()]
        return not self._copies and not self._abandoned and super().quiescent()


class CudaIpcAgent(NixlAgent, backend="cuda_ipc", sender=CudaIpcSender):
    """NIXL's agent whose sender copies to peers on its GPU; it receives as NIXL's
    does (a copy lands like a WRITE, and its notice names the same chunk)."""

    needs_gpu = True  # P copies into D's pool through CUDA IPC

    def __init__(self, config: TransferConfig, memory: KVMemory) -> None:
        super().__init__(config, memory)
        self._shareable: dict[str, CudaIpcMetadata] = {}  # same-GPU peers not mapped yet
        self._mapped: dict[str, _MappedPool] = {}
        self._rings_out: dict[str, RingWriter] = {}  # notices to mapped peers
        self._rings_in: dict[str, RingReader] = {}  # notices from peers that mapped us
        self._on_gpu = memory.device == "cuda" and memory.tensor is not None
        self._uuid = gpu_uuid(memory.device_id) if self._on_gpu else ""
        self._word = _word_dtype(memory.layout.page_bytes)
        if self._on_gpu:
            device = torch.device("cuda", memory.device_id)
            self._stream = torch.cuda.Stream(device)
            self._src = memory.tensor.view(-1).view(torch.uint8)[: memory.layout.total_bytes].view(self._word)
            from pdserve.transfer.kernels.ring_record import warm_up  # Triton: GPU only

            warm_up(device)  # compiled here, not when the first chunk's notice is due

    def _backend_metadata(self) -> bytes:
        storage, offset = [], 0
        if self._on_gpu:
            shared = self.memory.tensor.untyped_storage()
            storage, offset = list(shared._share_cuda_()), self.memory.base_ptr - shared.data_ptr()
        return encode(CudaIpcMetadata(nixl=super()._backend_metadata(), gpu_uuid=self._uuid, storage=storage, offset_bytes=offset))

    def _connect(self, info: AgentInfo) -> None:
        meta = decode_as(info.backend_metadata, CudaIpcMetadata)
        assert isinstance(meta, CudaIpcMetadata)
        super()._connect(replace(info, backend_metadata=meta.nixl))
        if self._on_gpu and meta.storage and meta.gpu_uuid == self._uuid:
            self._shareable[info.name] = meta

    def mapped(self, peer: str) -> _MappedPool | None:
        """The peer's pool mapped here, or None when NIXL serves that peer.

        Mapped on first send: a decode agent, which only receives, never maps
        its prefill peers' pools."""
        meta = self._shareable.pop(peer, None)
        if meta is not None:
            try:
                self._mapped[peer] = _MappedPool(meta, self.memory.device_id, self.peer(peer).kv_layout.total_bytes,
                                                 self._word)
                logger.info("peer %s shares this GPU: KV pages go through CUDA IPC", peer)
            except RuntimeError as exc:  # e.g. both agents in one process: CUDA refuses its own handles
                logger.warning("cannot map %s's pool through CUDA IPC (%s); using NIXL for it", peer, exc)
            else:
                self._offer_ring(peer)
        return self._mapped.get(peer)

    def _offer_ring(self, peer: str) -> None:
        """Open a notice ring to a mapped peer; without one, notices take NIXL."""
        try:
            ring = RingWriter(self.name, peer, device=self._stream.device)
        except (OSError, RuntimeError) as exc:
            logger.warning("no notice ring to %s (%s); chunk notices go over NIXL", peer, exc)
            return
        try:
            self.nixl.send_notif(peer, encode(RingOffer(sender=self.name, path=ring.path, num_records=ring.num_records)))
        except Exception as exc:  # nixl raises its own binding error types
            logger.warning("cannot offer a notice ring to %s: %s", peer, exc)
            ring.close()
            return
        self._rings_out[peer] = ring

    def _on_other(self, remote: str, msg: object) -> None:
        if not isinstance(msg, RingOffer):
            super()._on_other(remote, msg)
            return
        # Taken even from a peer not loaded (yet): the offering side writes its
        # notices only there from now on, and receivers check each notice's sender.
        if msg.sender != remote:
            logger.warning("ignoring a notice ring offered by %s for %s", remote, msg.sender)
            return
        try:
            ring = RingReader(msg.path, msg.num_records)
        except (OSError, ValueError) as exc:
            logger.warning("cannot open %s's notice ring (%s); its notices come over NIXL", remote, exc)
            return
        old = self._rings_in.pop(remote, None)
        if old is not None:
            old.close()
        self._rings_in[remote] = ring
        logger.info("peer %s shares this GPU and writes its chunk notices into a ring", remote)

    def progress(self) -> None:
        super().progress()
        for peer, ring in self._rings_in.items():
            for room, chunk_index, is_last in ring.poll():
                self.route(room, RoomNotice(room=room, kind=NOTICE_CHUNK, sender=peer, chunk_index=chunk_index, is_last=is_last))

    def _disconnect(self, name: str) -> None:
        self._shareable.pop(name, None)
        pool = self._mapped.pop(name, None)
        if pool is not None:
            self._stream.synchronize()  # no copy may outlive the mapping it writes through
            del pool  # closes the IPC mapping: the peer's memory can go back to the GPU
        self._close_rings(name)
        super()._disconnect(name)

    def _close_rings(self, name: str) -> None:
        """After the side stream drained: nothing queued writes to these rings."""
        for rings in (self._rings_out, self._rings_in):
            ring = rings.pop(name, None)
            if ring is not None:
                ring.close()

    def copy(self, runs: PageRuns, src_pages: list[int], dst_pages: list[int], theirs: KVLayout,
             peer: str, pool: _MappedPool, notice: RoomNotice) -> tuple[torch.cuda.Event, bool]:
        """Launch the copy of whole pages into ``pool`` (every region), then the
        chunk's notice into the peer's ring; (the completion event, whether the
        ring took the notice).

        A few runs of consecutive pages (the usual case: both pools hand out
        pages in order) are one strided ``copy_`` each, which launches faster
        than a Triton kernel; scattered pages take the page-copy kernel."""
        mine = self.memory.layout
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))  # the kernels that wrote the pages
        with torch.cuda.stream(self._stream):
            if len(runs) <= _MAX_STRIDED_RUNS:
                copy_runs(self._src.view(mine.num_regions, mine.num_pages, -1),
                          pool.words.view(theirs.num_regions, theirs.num_pages, -1), runs)
            else:
                self._copy_scattered(src_pages, dst_pages, theirs, pool)
            ring = self._rings_out.get(peer)
            in_ring = ring is not None and ring.post(notice.room, notice.chunk_index, notice.is_last, self._stream)
            event = torch.cuda.Event()
            event.record(self._stream)
        return event, in_ring

    def _copy_scattered(self, src_pages: list[int], dst_pages: list[int], theirs: KVLayout, pool: _MappedPool) -> None:
        from pdserve.transfer.kernels.page_copy import copy_pages

        mine, word = self.memory.layout, self._word.itemsize
        pages = torch.tensor([src_pages, dst_pages], dtype=torch.int32).to(self._stream.device, non_blocking=True)
        copy_pages(self._src, pool.words, pages[0], pages[1], mine.num_regions, mine.region_bytes // word,
                   theirs.region_bytes // word, mine.page_bytes // word)

    def _shutdown(self) -> None:
        if self._on_gpu:
            self._stream.synchronize()  # no copy may outlive the mappings
        self._mapped.clear()
        for name in set(self._rings_out) | set(self._rings_in):
            self._close_rings(name)
        super()._shutdown()
