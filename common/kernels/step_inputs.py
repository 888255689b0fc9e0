"""Host-side inputs of one forward step, built with numpy, and next-step prediction.

A step's device inputs are a few int arrays: token ids, positions, KV slots
of the new tokens, and a CSR page index (``kv_indptr``/``kv_indices``) that
every paged attention kernel reads. :func:`build_step` makes them from the
scheduler's batch in a handful of vectorised numpy calls.

Overlap: while the GPU runs decode step N, :func:`predict_next` builds step
N+1 for the same requests one token further. At step N+1 :meth:`Prediction.resolve`
checks that the batch is the predicted one (or the predicted one minus finished
requests) and fills in the only unknowns: the sampled token ids, and the page
of a request that crossed into a page the scheduler only allocated since.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import chain

import numpy as np

_PLACEHOLDER = -1


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


def build_step(
    is_decode: bool, chunks: list[list[int]], starts: list[int], page_tables: list[list[int]], page_size: int
) -> StepInputs:
    """Inputs of a batch that feeds ``chunks[i]`` at positions ``starts[i]...``."""
    ext = np.fromiter(map(len, chunks), dtype=np.int32, count=len(chunks))
    start = np.asarray(starts, dtype=np.int64)
    seq = (start + ext).astype(np.int32)
    qo_indptr = _indptr(ext)
    num_tokens = int(qo_indptr[-1])
    rows = np.repeat(np.arange(len(chunks)), ext)
    positions = (np.arange(num_tokens) - qo_indptr[:-1][rows] + start[rows]).astype(np.int64)
    num_pages = (seq + page_size - 1) // page_size
    kv_indptr = _indptr(num_pages)
    kv_indices = np.fromiter(
        chain.from_iterable(t[:n] for t, n in zip(page_tables, num_pages.tolist())),
        dtype=np.int32, count=int(kv_indptr[-1]),
    )
    return StepInputs(
        is_decode=is_decode,
        input_ids=np.fromiter(chain.from_iterable(chunks), dtype=np.int64, count=num_tokens),
        positions=positions,
        out_slots=_slots(kv_indptr, kv_indices, rows, positions, page_size),
        logits_indices=(qo_indptr[1:] - 1).astype(np.int64),
        qo_indptr=qo_indptr,
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
        kv_last_page_len=(seq - (num_pages - 1) * page_size).astype(np.int32),
        seq_lens=seq,
    )


def step_of(batch, page_size: int) -> StepInputs:
    """A ForwardBatch's host index: the runner hands it over in ``batch.attn``;
    a batch built elsewhere gets it rebuilt from its page tables."""
    if isinstance(batch.attn, StepInputs):
        return batch.attn
    chunks = [[0] * n for n in batch.extend_lens]
    starts = [s - n for s, n in zip(batch.seq_lens, batch.extend_lens)]
    return build_step(batch.is_decode, chunks, starts, batch.page_tables, page_size)


@dataclass
class Prediction:
    """Decode step N+1 as predicted during step N."""

    reqs: list  # the request objects (held, so their identity stays unique)
    starts: np.ndarray  # int64 [B] predicted position of each request's token
    step: StepInputs  # with placeholders for pages unknown at prediction time
    pending: list[tuple[int, int]]  # (row, page index) whose page is not known yet
    page_size: int

    def resolve(self, reqs: list, chunks: list[list[int]], starts: list[int]) -> StepInputs | None:
        rows = self._rows(reqs)
        if rows is None or not np.array_equal(self.starts[rows], np.asarray(starts, dtype=np.int64)):
            return None
        step = self.step if len(rows) == len(self.reqs) else _select(self.step, rows)
        step.kv_indices = step.kv_indices.copy()
        step.out_slots = step.out_slots.copy()
        row_of = {int(r): i for i, r in enumerate(rows)}
        for old_row, page_index in self.pending:
            i = row_of.get(old_row)
            if i is None:
                continue
            pages = reqs[i].pages
            if page_index >= len(pages):
                return None  # the scheduler did not reserve what the step needs
            page = pages[page_index]
            step.kv_indices[step.kv_indptr[i + 1] - 1] = page
            step.out_slots[i] = page * self.page_size + step.positions[i] % self.page_size
        step.input_ids = np.fromiter((c[0] for c in chunks), dtype=np.int64, count=len(chunks))
        return step

    def _rows(self, reqs: list) -> np.ndarray | None:
        """Rows of the prediction that ``reqs`` are, in order; None if any is new."""
        if len(reqs) == len(self.reqs) and all(a is b for a, b in zip(reqs, self.reqs)):
            return np.arange(len(reqs))
        index = {id(r): i for i, r in enumerate(self.reqs)}
        rows = [index.get(id(r), -1) for r in reqs]
        if not rows or min(rows) < 0 or any(b <= a for a, b in zip(rows, rows[1:])):
            return None
        return np.asarray(rows)


def _select(step: StepInputs, rows: np.ndarray) -> StepInputs:
    num_pages = np.diff(step.kv_indptr)
    keep = np.zeros(step.batch_size, dtype=bool)
    keep[rows] = True
    bs = len(rows)
    return replace(
        step,
        input_ids=step.input_ids[rows],
        positions=step.positions[rows],
        out_slots=step.out_slots[rows],
        logits_indices=np.arange(bs, dtype=np.int64),
        qo_indptr=np.arange(bs + 1, dtype=np.int32),
        kv_indptr=_indptr(num_pages[rows]),
        kv_indices=step.kv_indices[np.repeat(keep, num_pages)],
        kv_last_page_len=step.kv_last_page_len[rows],
        seq_lens=step.seq_lens[rows],
    )


def predict_next(step: StepInputs, reqs: list, page_size: int) -> Prediction:
    """Decode step N+1 of ``reqs`` given decode step N's inputs."""
    positions = step.positions + 1
    seq = step.seq_lens + 1
    crossing = positions % page_size == 0  # the next token starts a new page
    num_pages = np.diff(step.kv_indptr) + crossing
    kv_indptr = _indptr(num_pages)
    kv_indices = np.insert(step.kv_indices, step.kv_indptr[1:][crossing], _PLACEHOLDER)
    out_slots = np.empty_like(step.out_slots)
    out_slots[~crossing] = step.out_slots[~crossing] + 1  # same page, next slot
    pending = []
    for row in np.flatnonzero(crossing).tolist():
        page_index = int(positions[row]) // page_size
        pages = reqs[row].pages
        if page_index < len(pages):  # reserved ahead already
            kv_indices[kv_indptr[row + 1] - 1] = pages[page_index]
            out_slots[row] = pages[page_index] * page_size
        else:
            out_slots[row] = _PLACEHOLDER
            pending.append((row, page_index))
    nxt = StepInputs(
        is_decode=True,
        input_ids=step.input_ids,
        positions=positions,
        out_slots=out_slots,
        logits_indices=step.logits_indices,
        qo_indptr=step.qo_indptr,
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
        kv_last_page_len=(seq - (num_pages - 1) * page_size).astype(np.int32),
        seq_lens=seq,
    )
    return Prediction(list(reqs), positions.copy(), nxt, pending, page_size)
