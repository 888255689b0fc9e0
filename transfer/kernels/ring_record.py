"""Write one notice-ring record into page-locked host memory from a CUDA stream.

The ``cuda_ipc`` transfer backend tells the decode side that a chunk landed by
writing a 32-byte record into a shared-memory ring right after the page copy,
on the copy's stream. Two DMA copies (pinned staging -> device -> ring) cost
about 10 us after the page copy on an H100; one program storing the four words
straight into the ring's device mapping costs a kernel launch.

The record's words travel as eight int32 kernel arguments (low and high
halves), so every call has the same signature and nothing compiles in the
transfer path after the first (warm-up) launch. The sequence word is stored
last; the reader checks it together with the check word, so a record whose
stores land in any order is still never read half-written.
"""

from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl

_WORDS = 4


@triton.jit(do_not_specialize=["w0_lo", "w0_hi", "w1_lo", "w1_hi", "w2_lo", "w2_hi", "w3_lo", "w3_hi"])
def _store_record_kernel(slot_ptr, w0_lo, w0_hi, w1_lo, w1_hi, w2_lo, w2_hi, w3_lo, w3_hi):
    tl.store(slot_ptr + 2, w1_lo)
    tl.store(slot_ptr + 3, w1_hi)
    tl.store(slot_ptr + 4, w2_lo)
    tl.store(slot_ptr + 5, w2_hi)
    tl.store(slot_ptr + 6, w3_lo)
    tl.store(slot_ptr + 7, w3_hi)
    tl.store(slot_ptr + 0, w0_lo)
    tl.store(slot_ptr + 1, w0_hi)


def _halves(word: int) -> tuple[int, int]:
    """(low, high) signed int32 halves of a signed int64 word, little-endian."""
    unsigned = word & ((1 << 64) - 1)
    return tuple(h - (1 << 32) if h >= 1 << 31 else h for h in (unsigned & 0xFFFFFFFF, unsigned >> 32))


def store_record(slot: torch.Tensor, words: list[int], stream: torch.cuda.Stream) -> None:
    """Store four int64 ``words`` into ``slot`` (an int32 device view of one
    record, 8 elements) on ``stream``, the first word last."""
    args = [half for word in words for half in _halves(word)]
    with torch.cuda.stream(stream):
        _store_record_kernel[(1,)](slot, *args)


class _DeviceArray:
    """Exposes a raw device address to ``torch.as_tensor`` (no copy)."""

    def __init__(self, address: int, num_int32: int) -> None:
        self.__cuda_array_interface__ = {"shape": (num_int32,), "typestr": "<i4", "data": (address, False),
                                         "version": 3, "strides": None}


def device_view(host_ptr: int, num_int32: int, device: torch.device) -> torch.Tensor | None:
    """An int32 CUDA tensor over registered host memory at ``host_ptr``, or None
    where the driver gives no device address for it."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    address = ctypes.c_uint64()
    rc = driver.cuMemHostGetDevicePointer_v2(ctypes.byref(address), ctypes.c_void_p(host_ptr), ctypes.c_uint(0))
    if rc != 0 or not address.value:
        return None
    with torch.cuda.device(device):
        return torch.as_tensor(_DeviceArray(address.value, num_int32), device=device)


def warm_up(device: torch.device) -> None:
    """Compile the kernel now, on a scratch buffer, not at the first chunk."""
    scratch = torch.zeros(2 * _WORDS, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device)
    store_record(scratch, [1, -2, 3, -(1 << 62)], stream)
    stream.synchronize()
    expected = torch.tensor([1, -2, 3, -(1 << 62)], dtype=torch.int64)
    if not torch.equal(scratch.cpu().view(torch.int64), expected):
        raise RuntimeError("the ring record kernel stored wrong words")
