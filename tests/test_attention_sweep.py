"""The attention sweep's grids hold the launches the product uses, so every
sweep times the product's configuration beside the others (no GPU needed)."""

from __future__ import annotations

import pytest
from pdserve.benchmarks.attention_sweep import DECODE_GRID, EXTEND_GRID
from pdserve.model.kernels.tilings import (
    decode_tiling,
    extend_smem_bytes,
    extend_tiling,
    query_block,
)

H100_SMEM_BYTES = 227 * 1024


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_decode_launch_in_use_is_in_the_grid(head_dim: int) -> None:
    # one split: what num_kv_splits gives batches of 128 and 256 with 8 KV heads on 132 SMs
    assert (*decode_tiling(head_dim), 1) in DECODE_GRID


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_extend_launch_in_use_is_in_the_grid(head_dim: int) -> None:
    block_n, warps, stages = extend_tiling(head_dim, H100_SMEM_BYTES)
    assert ((query_block(head_dim), block_n), warps, stages) in EXTEND_GRID


def test_extend_tiling_fits_the_shared_memory_it_is_given() -> None:
    for smem in (48 * 1024, 99 * 1024, 163 * 1024, H100_SMEM_BYTES):
        for head_dim in (64, 128):
            block_n, _, stages = extend_tiling(head_dim, smem)
            assert extend_smem_bytes(query_block(head_dim), block_n, head_dim, stages) <= smem or (block_n, stages) == (32, 1)
    assert extend_tiling(128, H100_SMEM_BYTES)[::2] == (128, 3)  # the sweep's winner where it fits
    assert extend_tiling(128, 163 * 1024)[::2] == (128, 2)  # an A100: one stage fewer
