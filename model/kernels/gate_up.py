"""The gate/up product of a decode batch with silu-and-multiply fused in.

A decode step at batch 64-256 multiplies that many token rows by each weight:
the work is bound by reading the weight once. For the MLP's ``[gate; up]``
weight (``[2I, K]``) a program here reads the matching rows of both halves,
multiplies them with the batch on tensor cores and writes
``silu(gate) * up`` (rounded where the unfused model rounds), so the
``[M, 2I]`` product never goes to memory and the separate silu-and-multiply
kernel is gone.

Program ``(row block, column block)``. It is used only for the shapes and
batch sizes where ``benchmarks/gate_up_sweep.py`` measured it faster than
cuBLAS plus ``silu_mul`` (``tilings.GATE_UP_TUNED``), on Hopper; elsewhere the model runs
those two. The sweep's first form (commit 5fded09) also timed the qkv, o and
down products with and without a split over K: the best of them was at most
4% faster than cuBLAS, and mostly slower (benchmarks/results/gemm-sweep-h100.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pdserve.model.kernels.tilings import GateUpConfig, cdiv, next_pow2


def block_m(num_rows: int) -> int:
    """Token rows per program: the batch up to 128 (tensor cores take 16 or more)."""
    return min(max(16, next_pow2(num_rows)), 128)


@triton.jit
def _tile_product(x_ptr, w_ptr, rows, cols, K, row_mask, col_mask,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=col_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _gate_up_silu_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    gate = _tile_product(x_ptr, w_ptr, rows, cols, K, row_mask, col_mask, BLOCK_M, BLOCK_N, BLOCK_K)
    up = _tile_product(x_ptr, w_ptr, rows, cols + N, K, row_mask, col_mask, BLOCK_M, BLOCK_N, BLOCK_K)
    dt = out_ptr.dtype.element_ty
    g = gate.to(dt).to(tl.float32)
    y = ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * up.to(dt).to(tl.float32)).to(dt)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], y, mask=row_mask[:, None] & col_mask[None, :])


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, config: GateUpConfig, *, pdl: bool = False) -> torch.Tensor:
    """``silu(x @ gate^T) * (x @ up^T)`` for ``x [M, K]`` and ``weight = [gate; up]``
    ``[2I, K]`` -> ``[M, I]``. ``K`` must be a whole number of ``config.block_k`` tiles."""
    m, k = x.shape
    n = weight.shape[0] // 2
    if k % config.block_k or not weight.is_contiguous():
        raise ValueError(f"K={k} is not a whole number of {config.block_k}-wide tiles, or the weight is strided")
    x = x.contiguous()
    bm = block_m(m)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gate_up_silu_kernel[(cdiv(m, bm), cdiv(n, config.block_n))](
        x, weight, out, m, n, k, BLOCK_M=bm, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    return out
