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
class PageRun:
    src_start: int
    dst_start: int
    num_pages: int


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


def merge_page_runs(src_pages: list[int], dst_pages: list[int]) -> list[PageRun]:
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    runs: list[PageRun] = []
    for s, d in zip(src_pages, dst_pages, strict=True):
        last = runs[-1] if runs else None
        if last and s == last.src_start + last.num_pages and d == last.dst_start + last.num_pages:
            runs[-1] = PageRun(last.src_start, last.dst_start, last.num_pages + 1)
        else:
            runs.append(PageRun(s, d, 1))
    return runs


def _check_pages(pages: list[int], num_pages: int, side: str) -> None:
    bad = [p for p in pages if not 0 <= p < num_pages]
    if bad:
        raise ValueError(f"{side} pages {bad[:8]} out of range [0, {num_pages})")


def build_descriptors(
    src_pages: list[int], dst_pages: list[int], src_layout: KVLayout, dst_layout: KVLayout
) -> DescriptorList:
    """Merged descriptors for every region; region-major order.

    The two layouts pair (same page bytes and regions) but may differ in
    ``num_pages``, so each side's offsets use its own layout."""
    if src_layout.page_bytes != dst_layout.page_bytes or src_layout.num_regions != dst_layout.num_regions:
        raise ValueError("source and destination layouts do not pair")
    _check_pages(src_pages, src_layout.num_pages, "source")
    _check_pages(dst_pages, dst_layout.num_pages, "destination")
    runs = merge_page_runs(src_pages, dst_pages)
    if not runs:
        empty = np.zeros(0, dtype=np.uint64)
        return DescriptorList(empty, empty, empty)
    run_src = np.array([r.src_start for r in runs], dtype=np.uint64)
    run_dst = np.array([r.dst_start for r in runs], dtype=np.uint64)
    run_len = np.array([r.num_pages for r in runs], dtype=np.uint64)
    regions = np.arange(src_layout.num_regions, dtype=np.uint64)[:, None]
    page_bytes = np.uint64(src_layout.page_bytes)
    src = regions * np.uint64(src_layout.region_bytes) + run_src[None, :] * page_bytes
    dst = regions * np.uint64(dst_layout.region_bytes) + run_dst[None, :] * page_bytes
    lengths = np.broadcast_to(run_len[None, :] * page_bytes, src.shape)
    return DescriptorList(src.reshape(-1), dst.reshape(-1), np.ascontiguousarray(lengths).reshape(-1))
