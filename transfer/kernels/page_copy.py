"""Copy KV pages from one pool buffer into another in one launch (Triton).

Used by the ``cuda_ipc`` transfer backend: the destination is the decode
instance's pool, mapped into the prefill process through CUDA IPC. Program
(i, r) copies page ``src_pages[i]`` of region r to page ``dst_pages[i]`` of
region r; the two pools may hold different numbers of pages, so each side has
its own region stride. Offsets are computed on the device, so the host only
uploads the two page lists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # elements each loop iteration moves per program


@triton.jit
def _copy_pages_kernel(src_ptr, dst_ptr, src_pages_ptr, dst_pages_ptr, src_region_elems, dst_region_elems,
                       page_elems, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    region = tl.program_id(1).to(tl.int64)
    src_start = region * src_region_elems + tl.load(src_pages_ptr + i).to(tl.int64) * page_elems
    dst_start = region * dst_region_elems + tl.load(dst_pages_ptr + i).to(tl.int64) * page_elems
    for begin in range(0, page_elems, BLOCK):
        cols = begin + tl.arange(0, BLOCK)
        mask = cols < page_elems
        values = tl.load(src_ptr + src_start + cols, mask=mask)
        tl.store(dst_ptr + dst_start + cols, values, mask=mask)


def copy_pages(src: torch.Tensor, dst: torch.Tensor, src_pages: torch.Tensor, dst_pages: torch.Tensor,
               num_regions: int, src_region_elems: int, dst_region_elems: int, page_elems: int) -> None:
    """For every region r and i: ``dst`` page ``dst_pages[i]`` of r = ``src`` page ``src_pages[i]`` of r.

    ``src``/``dst`` are flat buffers of one dtype on one device, region r
    starting at ``r * *_region_elems``; the page lists are int tensors on that
    device. Runs on the current stream."""
    if src.dtype != dst.dtype or src.device != dst.device:
        raise ValueError("page copy needs two buffers of one dtype on one device")
    if src_pages.shape != dst_pages.shape:
        raise ValueError("as many source as destination pages")
    if src_pages.numel() == 0 or num_regions == 0:
        return
    grid = (src_pages.numel(), num_regions)
    _copy_pages_kernel[grid](src, dst, src_pages, dst_pages, src_region_elems, dst_region_elems, page_elems,
                             BLOCK=_BLOCK)
