"""Launch configurations of the Triton attention kernels, chosen by
``benchmarks/attention_sweep.py`` (the winners on an H100 for heads of 64 and
128). Plain Python, so the host code that sizes tile tables and the tests read
them without Triton."""

from __future__ import annotations


def query_block(head_dim: int) -> int:
    """Query rows per program of the extend kernel (what a tile table counts
    in): with 128-key tiles, 1.2-1.4x the 32-row blocks before; larger heads
    keep a small block for their registers."""
    if head_dim <= 64:
        return 64
    return 128 if head_dim <= 128 else 32


def extend_tiling(head_dim: int, smem_bytes: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the extend kernel: 128-key tiles in
    three stages where they fit; a device with less shared memory per block
    (``smem_bytes``) gets fewer stages, then smaller tiles."""
    block_m = query_block(head_dim)
    warps = 8 if block_m >= 128 else 4
    for block_n, stages in ((128, 3), (128, 2), (64, 2)):
        if extend_smem_bytes(block_m, block_n, head_dim, stages) <= smem_bytes:
            return block_n, warps, stages
    return 32, 4, 1


def extend_smem_bytes(block_m: int, block_n: int, head_dim: int, stages: int) -> int:
    """Shared memory an extend launch needs, about: ``stages`` buffered K and V
    tiles and the query block, in bf16/fp16."""
    return 2 * (2 * stages * block_n + block_m) * head_dim


def decode_tiling(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of decode stage 1: for heads of 128,
    1.07-1.22x the 32-key tiles in two stages before at batch 128 and 256."""
    return (64 if head_dim > 64 else 32), 4, 3
