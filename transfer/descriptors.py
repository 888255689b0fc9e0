"""Page lists to transfer descriptors.

A chunk moves ``src[i] -> dst[i]``. Pages that are consecutive on BOTH sides
form one run, and a run becomes one descriptor per region (layer, K/V): the
fewer descriptors, the fewer work requests the NIC (or copy engine) sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pdserve.common.kv_layout import KVLayout


@dataclass(frozen=True)
class DescriptorList:
    """Byte offsets from each buffer's base, one row per descriptor."""

    src_offsets: np.ndarray  # uint64
    dst_offsets: np.ndarray  # uint64
    lengths: np.ndarray  # uint64

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_bytes(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class PageRuns:
    """Runs of pages consecutive on both sides, as arrays (numpy: a prompt
    has thousands of pages, and this runs on the engine thread)."""

    src_starts: np.ndarray  # int64
    dst_starts: np.ndarray  # int64
    lengths: np.ndarray  # int64, pages per run

    def __len__(self) -> int:
        return len(self.lengths)


def page_runs(src_pages: list[int], dst_pages: list[int]) -> PageRuns:
    src = np.asarray(src_pages, dtype=np.int64)
    dst = np.asarray(dst_pages, dtype=np.int64)
    if src.shape != dst.shape:
        raise ValueError(f"{len(src)} source pages but {len(dst)} destination pages")
    if len(src) == 0:
        return PageRuns(src, dst, src)
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.append(starts, len(src)))
    return PageRuns(src[starts], dst[starts], lengths)


def check_pages(runs: PageRuns, src_layout: KVLayout, dst_layout: KVLayout) -> None:
    """Every page of every run exists on its side (runs are ascending)."""
    for side, starts, num_pages in (("source", runs.src_starts, src_layout.num_pages),
                                    ("destination", runs.dst_starts, dst_layout.num_pages)):
        if len(runs) and (starts.min() < 0 or (starts + runs.lengths).max() > num_pages):
            bad = sorted({int(p) for s, n in zip(starts, runs.lengths) for p in range(s, s + n)
                          if not 0 <= p < num_pages})
            raise ValueError(f"{side} pages {bad[:8]} out of range [0, {num_pages})")


def build_descriptors(
    src_pages: list[int], dst_pages: list[int], src_layout: KVLayout, dst_layout: KVLayout
) -> DescriptorList:
    """Merged descriptors for every region; region-major order."""
    return descriptors_of(page_runs(src_pages, dst_pages), src_layout, dst_layout)


def shared_heads(src_layout: KVLayout, dst_layout: KVLayout) -> tuple[int, int]:
    """(first, end) of the model's KV heads both buffers hold (tensor parallelism)."""
    first = max(src_layout.head_start, dst_layout.head_start)
    end = min(src_layout.head_start + src_layout.num_kv_heads, dst_layout.head_start + dst_layout.num_kv_heads)
    if end <= first:
        raise ValueError(f"source heads from {src_layout.head_start} and destination heads from "
                         f"{dst_layout.head_start} have no KV head in common")
    return first, end


def whole_pages(src_layout: KVLayout, dst_layout: KVLayout) -> bool:
    """Both sides hold the same heads: a page moves as one run of bytes."""
    return (src_layout.head_start, src_layout.num_kv_heads) == (dst_layout.head_start, dst_layout.num_kv_heads)


def descriptors_of(runs: PageRuns, src_layout: KVLayout, dst_layout: KVLayout) -> DescriptorList:
    """The two layouts pair (same page size, head size and regions) but may differ in
    ``num_pages``, so each side's offsets use its own layout. Where the two sides
    hold different KV heads (tensor parallelism), only the heads they share
    move: one descriptor per token of each page (:func:`_head_slices`)."""
    if (src_layout.page_size, src_layout.head_dim, src_layout.itemsize, src_layout.num_regions) != (
            dst_layout.page_size, dst_layout.head_dim, dst_layout.itemsize, dst_layout.num_regions):
        raise ValueError("source and destination layouts do not pair")
    check_pages(runs, src_layout, dst_layout)
    if not len(runs):
        empty = np.zeros(0, dtype=np.uint64)
        return DescriptorList(empty, empty, empty)
    if not whole_pages(src_layout, dst_layout):
        return _head_slices(runs, src_layout, dst_layout)
    regions = np.arange(src_layout.num_regions, dtype=np.uint64)[:, None]
    page_bytes = np.uint64(src_layout.page_bytes)
    src = regions * np.uint64(src_layout.region_bytes) + runs.src_starts.astype(np.uint64)[None, :] * page_bytes
    dst = regions * np.uint64(dst_layout.region_bytes) + runs.dst_starts.astype(np.uint64)[None, :] * page_bytes
    lengths = np.broadcast_to(runs.lengths.astype(np.uint64)[None, :] * page_bytes, src.shape)
    return DescriptorList(src.reshape(-1), dst.reshape(-1), np.ascontiguousarray(lengths).reshape(-1))


def _head_slices(runs: PageRuns, src_layout: KVLayout, dst_layout: KVLayout) -> DescriptorList:
    """The shared heads of every token of every page, region-major: inside a page
    a token's heads are adjacent, so each token's slice is one run of bytes."""
    first, end = shared_heads(src_layout, dst_layout)
    head_bytes = src_layout.head_dim * src_layout.itemsize
    src_pages = np.concatenate([np.arange(s, s + n) for s, n in zip(runs.src_starts, runs.lengths)]).astype(np.uint64)
    dst_pages = np.concatenate([np.arange(s, s + n) for s, n in zip(runs.dst_starts, runs.lengths)]).astype(np.uint64)
    tokens = np.arange(src_layout.page_size, dtype=np.uint64)
    regions = np.arange(src_layout.num_regions, dtype=np.uint64)

    def offsets(layout: KVLayout, pages: np.ndarray) -> np.ndarray:
        skip = np.uint64((first - layout.head_start) * head_bytes)
        per_page = pages[:, None] * np.uint64(layout.page_bytes) + tokens[None, :] * np.uint64(layout.token_bytes) + skip
        return (regions[:, None] * np.uint64(layout.region_bytes) + per_page.reshape(-1)[None, :]).reshape(-1)

    src = offsets(src_layout, src_pages)
    lengths = np.full(len(src), (end - first) * head_bytes, dtype=np.uint64)
    return DescriptorList(src, offsets(dst_layout, dst_pages), lengths)
