"""Launch configurations of the Triton attention kernels, chosen by
``benchmarks/attention_sweep.py`` (the winners on an H100 for heads of 64 and
128; results in ``benchmarks/results/attention-sweep-*.json``), and of the
fused gate/up product, chosen by ``benchmarks/gate_up_sweep.py``. Plain
Python, so the host code that sizes tile tables, the dispatch and the tests
read them without Triton."""

from __future__ import annotations

import functools
from dataclasses import dataclass


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``). Plain Python:
    ``triton.next_power_of_2`` called from the host costs ~2 us a call (it
    is a constexpr function), several times a layer in an eager forward."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_block(group: int) -> int:
    """Rows a token takes in an extend program: its ``group`` query heads of
    one kv head, padded to a power of two."""
    return next_pow2(group)


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


# Shared memory the pipelined tiles may take (an H100 block can have 227 KiB).
GATE_UP_SMEM_BYTES = 200 * 1024


@dataclass(frozen=True)
class GateUpConfig:
    block_n: int  # output columns per program, from each half
    block_k: int
    num_warps: int
    num_stages: int


# Faster than cuBLAS + silu_mul on an H100 (gemm-sweep-h100.json: 20 launches
# chained in a CUDA graph, each on its own weight), by 4-11%; keys are
# (token rows, I, K), and a batch takes the entry of the smallest tuned row
# count at or above its own, if that is under twice its own.
GATE_UP_TUNED: dict[tuple[int, int, int], GateUpConfig] = {
    # Llama-3.2-1B (at 256 rows the sweep's 0.96 of cuBLAS did not hold in the
    # model: the decode step took 1.4% longer with it, benchmarks/results/README.md)
    (64, 8192, 2048): GateUpConfig(64, 128, 4, 4),
    (128, 8192, 2048): GateUpConfig(64, 128, 4, 4),
    # Llama-3.1-8B (at 256 rows cuBLAS was faster)
    (64, 14336, 4096): GateUpConfig(128, 128, 8, 3),
    (128, 14336, 4096): GateUpConfig(128, 128, 8, 3),
}


@functools.cache  # asked once per layer of every eager forward
def gate_up_config(rows: int, n: int, k: int) -> GateUpConfig | None:
    """The measured winner for ``rows`` token rows times a ``[2n, k]`` weight, or None."""
    tuned_rows = sorted(r for r, tn, tk in GATE_UP_TUNED if (tn, tk) == (n, k) and rows <= r < 2 * rows)
    return GATE_UP_TUNED[(tuned_rows[0], n, k)] if tuned_rows else None


def gate_up_candidates() -> list[GateUpConfig]:
    """The configurations the sweep tries: column blocks of 64 (4 warps) or 128
    (8 warps), K tiles of 64 or 128, 3 or 4 stages where 128 token rows' and
    both halves' tiles fit in shared memory."""
    out = []
    for bn in (64, 128):
        for bk in (64, 128):
            for stages in (3, 4):
                if (128 + bn) * bk * 2 * stages <= GATE_UP_SMEM_BYTES:
                    out.append(GateUpConfig(bn, bk, 4 if bn == 64 else 8, stages))
    return out
