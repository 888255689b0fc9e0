"""Launch configurations of the Triton attention kernels, chosen by
``benchmarks/attention_sweep.py`` (the winners on an H100 for heads of 64 and
128; results in ``benchmarks/results/attention-sweep-*.json``). Plain Python,
so the host code that sizes tile tables and the tests read them without
Triton."""

from __future__ import annotations


def group_block(group: int) -> int:
    """Rows a token takes in an extend program: its ``group`` query heads of
    one kv head, padded to a power of two."""
    return 1 << max(group - 1, 0).bit_length()


def extend_rows(head_dim: int) -> int:
    """Query rows (tokens x grouped heads) per extend program: 64 rows on 4
    warps won the sweep at 512 and 2048 tokens for heads of 64 and 128 (within
    2% of the best at 8B's 2048); larger heads keep a small block for their
    registers."""
    return 64 if head_dim <= 128 else 32


def query_block(head_dim: int, group: int) -> int:
    """Tokens per extend program (what a tile table counts in): the rows of
    :func:`extend_rows` shared among each token's grouped heads."""
    return max(1, extend_rows(head_dim) // group_block(group))


def extend_tiling(head_dim: int, group: int, smem_bytes: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the extend kernel: 64-key tiles in
    two stages where they fit; a device with less shared memory per block
    (``smem_bytes``) gets smaller tiles. Timed as a forward runs the kernel
    (replayed in a CUDA graph, the layer's K/V just written and in L2), two
    stages and three are within a few percent of each other either way
    (``attention_sweep --warm-cache``); two need 80 KiB at heads of 128
    where three need 112, so two keep fitting on devices with less."""
    rows = query_block(head_dim, group) * group_block(group)
    warps = 8 if rows >= 128 else 4
    for block_n, stages in ((64, 2), (32, 2)):
        if extend_smem_bytes(rows, block_n, head_dim, stages) <= smem_bytes:
            return block_n, warps, stages
    return 32, 4, 1


def extend_smem_bytes(rows: int, block_n: int, head_dim: int, stages: int) -> int:
    """Shared memory an extend launch needs, about: ``stages`` buffered K and V
    tiles and the query rows, in bf16/fp16."""
    return 2 * (2 * stages * block_n + rows) * head_dim


def decode_tiling(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of decode stage 1: for heads of 128,
    1.07-1.22x the 32-key tiles in two stages before at batch 128 and 256."""
    return (64 if head_dim > 64 else 32), 4, 3
