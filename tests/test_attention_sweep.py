"""The attention sweep's grids hold the launches the product uses, so every
sweep times the product's configuration beside the others (no GPU needed)."""

from __future__ import annotations

import pytest
from pdserve.benchmarks.attention_sweep import DECODE_GRID, EXTEND_GRID
from pdserve.model.kernels.tilings import (
    decode_tiling,
    extend_smem_bytes,
    extend_tiling,
    group_block,
    query_block,
)

H100_SMEM_BYTES = 227 * 1024


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_decode_launch_in_use_is_in_the_grid(head_dim: int) -> None:
    # one split: what num_kv_splits gives batches of 128 and 256 with 8 KV heads on 132 SMs
    assert (*decode_tiling(head_dim), 1) in DECODE_GRID


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_extend_launch_in_use_is_in_the_grid(head_dim: int) -> None:
    group = 4  # both benchmark shapes: 32 query heads over 8 kv heads
    block_n, warps, stages = extend_tiling(head_dim, group, H100_SMEM_BYTES)
    assert ((query_block(head_dim, group) * group_block(group), block_n), warps, stages) in EXTEND_GRID


def test_extend_tiling_fits_the_shared_memory_it_is_given() -> None:
    for smem in (48 * 1024, 99 * 1024, 163 * 1024, H100_SMEM_BYTES):
        for head_dim in (64, 128, 256):
            for group in (1, 4, 7):
                rows = query_block(head_dim, group) * group_block(group)
                block_n, _, stages = extend_tiling(head_dim, group, smem)
                fits = extend_smem_bytes(rows, block_n, head_dim, stages) <= smem
                assert fits or (block_n, stages) == (32, 1)
    assert extend_tiling(128, 4, H100_SMEM_BYTES) == (64, 4, 2)  # 64-key tiles in two stages, where they fit
    assert extend_tiling(128, 4, 64 * 1024)[::2] == (32, 2)  # 64 KiB a block: smaller tiles


def test_a_token_takes_its_grouped_heads_in_a_power_of_two_rows() -> None:
    assert [group_block(g) for g in (1, 2, 3, 4, 7, 8)] == [1, 2, 4, 4, 8, 8]
    assert query_block(64, 4) == 16 and query_block(128, 1) == 64 and query_block(256, 8) == 4


def test_the_host_side_helpers_agree_with_tritons() -> None:
    # the launch wrappers size blocks and grids with these instead of Triton's
    # constexpr functions, which cost ~2 us a call on the host
    triton = pytest.importorskip("triton")
    from pdserve.model.kernels.tilings import cdiv, next_pow2

    for n in range(1, 5000):
        assert next_pow2(n) == triton.next_power_of_2(n)
        assert cdiv(n, 64) == triton.cdiv(n, 64) and cdiv(n, 7) == triton.cdiv(n, 7)
