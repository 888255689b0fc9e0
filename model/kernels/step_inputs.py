"""Host-side inputs of one forward step, built with numpy.

A step's device inputs are a few int arrays: token ids, positions, KV slots
of the new tokens, and a CSR page index (``kv_indptr``/``kv_indices``) that
every paged attention kernel reads. :func:`build_step` makes them from the
scheduler's batch in a handful of vectorised numpy calls. A step launched
before its input tokens reach the host takes them from the device
(:func:`feed_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch


@dataclass
class StepInputs:
    is_decode: bool
    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    out_slots: np.ndarray  # int64 [T]; negative: do not store (padding)
    logits_indices: np.ndarray  # int64 [B]
    qo_indptr: np.ndarray  # int32 [B + 1]
    kv_indptr: np.ndarray  # int32 [B + 1], in pages
    kv_indices: np.ndarray  # int32 [kv_indptr[-1]]
    kv_last_page_len: np.ndarray  # int32 [B]
    seq_lens: np.ndarray  # int32 [B], KV length after this step

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_extend_len(self) -> int:
        return int(np.diff(self.qo_indptr).max(initial=0))

    def padded(self, batch_size: int) -> StepInputs:
        """A decode step grown to ``batch_size`` rows: each extra row is a
        one-token sequence on page 0 whose KV is not stored."""
        extra = batch_size - self.batch_size
        if extra <= 0:
            return self
        ones = np.ones(extra, dtype=np.int32)
        tail = self.kv_indptr[-1] + np.arange(1, extra + 1, dtype=np.int32)
        return StepInputs(
            is_decode=True,
            input_ids=np.concatenate([self.input_ids, np.zeros(extra, np.int64)]),
            positions=np.concatenate([self.positions, np.zeros(extra, np.int64)]),
            out_slots=np.concatenate([self.out_slots, np.full(extra, -1, np.int64)]),
            logits_indices=np.arange(batch_size, dtype=np.int64),
            qo_indptr=np.arange(batch_size + 1, dtype=np.int32),
            kv_indptr=np.concatenate([self.kv_indptr, tail]),
            kv_indices=np.concatenate([self.kv_indices, np.zeros(extra, np.int32)]),
            kv_last_page_len=np.concatenate([self.kv_last_page_len, ones]),
            seq_lens=np.concatenate([self.seq_lens, ones]),
        )


def _indptr(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(counts.shape[0] + 1, dtype=np.int32)
    np.cumsum(counts, out=out[1:])
    return out


def _slots(kv_indptr: np.ndarray, kv_indices: np.ndarray, rows: np.ndarray, positions: np.ndarray,
           page_size: int) -> np.ndarray:
    pages = kv_indices[kv_indptr[rows] + positions // page_size].astype(np.int64)
    return pages * page_size + positions % page_size


# (page lists, pages wanted of each) -> those pages, concatenated (int32); see model/page_tables.py
PageGather = Callable[[list[list[int]], np.ndarray], np.ndarray]


def build_step(
    is_decode: bool, chunks: list[list[int]], starts: list[int], page_tables: list[list[int]], page_size: int,
    gather: PageGather | None = None,
) -> StepInputs:
    """Inputs of a batch that feeds ``chunks[i]`` at positions ``starts[i]...``
    (a decode step: one token per request); ``gather`` reads the page index
    from tables kept across steps."""
    if is_decode:
        return _decode_step(chunks, starts, page_tables, page_size, gather)
    return _ragged_step(is_decode, chunks, starts, page_tables, page_size, gather)


def _ragged_step(
    is_decode: bool, chunks: list[list[int]], starts: list[int], page_tables: list[list[int]], page_size: int,
    gather: PageGather | None,
) -> StepInputs:
    """:func:`build_step` of any batch."""
    ext = np.fromiter(map(len, chunks), dtype=np.int32, count=len(chunks))
    start = np.asarray(starts, dtype=np.int64)
    seq = (start + ext).astype(np.int32)
    qo_indptr = _indptr(ext)
    num_tokens = int(qo_indptr[-1])
    rows = np.repeat(np.arange(len(chunks)), ext)
    positions = (np.arange(num_tokens) - qo_indptr[:-1][rows] + start[rows]).astype(np.int64)
    kv = _kv_fields(seq, page_tables, page_size, gather)
    return StepInputs(
        is_decode=is_decode,
        input_ids=np.fromiter(chain.from_iterable(chunks), dtype=np.int64, count=num_tokens),
        positions=positions,
        out_slots=_slots(kv["kv_indptr"], kv["kv_indices"], rows, positions, page_size),
        logits_indices=(qo_indptr[1:] - 1).astype(np.int64),
        qo_indptr=qo_indptr,
        **kv,
    )


def _decode_step(
    chunks: list[list[int]], starts: list[int], page_tables: list[list[int]], page_size: int,
    gather: PageGather | None,
) -> StepInputs:
    """:func:`build_step` of one token per request: the ragged bookkeeping
    collapses (row i is token i), and each token lands in its last page."""
    n = len(chunks)
    positions = np.asarray(starts, dtype=np.int64)
    seq = (positions + 1).astype(np.int32)
    kv = _kv_fields(seq, page_tables, page_size, gather)
    last_pages = kv["kv_indices"][kv["kv_indptr"][1:] - 1]
    return StepInputs(
        is_decode=True,
        input_ids=np.fromiter(chain.from_iterable(chunks), dtype=np.int64, count=n),
        positions=positions,
        out_slots=last_pages.astype(np.int64) * page_size + positions % page_size,
        logits_indices=np.arange(n, dtype=np.int64),
        qo_indptr=np.arange(n + 1, dtype=np.int32),
        **kv,
    )


def _kv_fields(seq: np.ndarray, page_tables: list[list[int]], page_size: int,
               gather: PageGather | None) -> dict[str, np.ndarray]:
    """The paged-KV fields of a step whose sequences end at ``seq`` tokens."""
    num_pages = (seq + page_size - 1) // page_size
    kv_indptr = _indptr(num_pages)
    return {"kv_indptr": kv_indptr, "kv_indices": _page_index(page_tables, num_pages, int(kv_indptr[-1]), gather),
            "kv_last_page_len": (seq - (num_pages - 1) * page_size).astype(np.int32), "seq_lens": seq}


def _page_index(page_tables: list[list[int]], num_pages: np.ndarray, total: int,
                gather: PageGather | None) -> np.ndarray:
    """The first ``num_pages[i]`` pages of each table, concatenated (int32)."""
    if gather is not None:
        return gather(page_tables, num_pages)
    return np.fromiter(chain.from_iterable(t[:n] for t, n in zip(page_tables, num_pages.tolist())),
                       dtype=np.int32, count=total)


def tile_table(qo_indptr: np.ndarray, block_m: int, num_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, query block) of each of ``num_tiles`` tiles covering every
    sequence's new tokens; unused tiles have sequence -1. Raises when the
    batch needs more tiles."""
    blocks = -(-np.diff(qo_indptr) // block_m)
    total = int(blocks.sum())
    if total > num_tiles:
        raise ValueError(f"batch needs {total} query tiles, the table has {num_tiles}")
    seq = np.full(num_tiles, -1, dtype=np.int32)
    block = np.zeros(num_tiles, dtype=np.int32)
    seq[:total] = np.repeat(np.arange(blocks.shape[0], dtype=np.int32), blocks)
    block[:total] = np.arange(total, dtype=np.int32) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    return seq, block


def max_tiles(num_tokens: int, max_seqs: int, block_m: int) -> int:
    """Tiles of ``block_m`` tokens a batch of at most ``max_seqs`` sequences
    and ``num_tokens`` new tokens can need: each sequence's last block may be
    partial."""
    return -(-num_tokens // block_m) + max_seqs


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without waiting for the GPU: a copy from pageable
    memory first waits for all queued work, which would undo the overlap
    schedule; from pinned memory it is queued like a kernel."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def feed_tokens(ids: torch.Tensor, src: torch.Tensor, src_host: np.ndarray, tokens: torch.Tensor) -> None:
    """``ids[i] = tokens[src[i]]`` wherever ``src[i] >= 0``, on the device.

    The overlap schedule launches a decode step before the previous step's
    sampled tokens reach the host; those rows read them from ``tokens``.
    ``src_host`` is ``src``'s host copy, to pick the one-kernel common case."""
    n = src_host.shape[0]
    if n <= tokens.shape[0] and np.array_equal(src_host, np.arange(n)):
        ids.copy_(tokens[:n])  # the same batch one token further
        return
    picked = tokens.index_select(0, src.clamp(min=0).long()).to(ids.dtype)
    ids.copy_(torch.where(src >= 0, picked, ids))


def step_of(batch, page_size: int) -> StepInputs:
    """A ForwardBatch's host index: the runner hands it over in ``batch.attn``;
    a batch built elsewhere gets it rebuilt from its page tables."""
    if isinstance(batch.attn, StepInputs):
        return batch.attn
    chunks = [[0] * n for n in batch.extend_lens]
    starts = [s - n for s, n in zip(batch.seq_lens, batch.extend_lens)]
    return build_step(batch.is_decode, chunks, starts, batch.page_tables, page_size)
