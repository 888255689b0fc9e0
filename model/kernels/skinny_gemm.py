"""Products of a few rows (a decode batch) with a weight, silu-and-multiply fused.

A decode step at batch 64-256 multiplies a few hundred token rows by each
weight: the work is bound by reading the weight once, and cuBLAS, whose
tilings are chosen for large products, leaves a good part of the bandwidth
unused on the smaller projections (benchmarks/roofline.py --gemm-sweep).

Program ``(row block, column block, K split)``: ``x[rows, k-range]`` times
``W[cols, k-range]^T`` on tensor cores. A column block of at least as many
weight rows as there are token rows keeps the re-reads of ``x`` (from L2) no
larger than the weight itself; the K splits give the grid enough programs to
keep every SM reading. Split partial sums go to a float32 workspace; the last
program of a tile to arrive (a counter per tile) adds them up and writes the
result, and resets the counter for the next launch, so a split product is
still one kernel.

``gated``: the weight is ``[gate; up]`` (``[2I, K]``); a program reads the
matching rows of both halves and writes ``silu(gate) * up``, rounded where the
unfused model rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Shared memory the pipelined tiles may take (an H100 block can have 227 KiB).
SMEM_BUDGET_BYTES = 200 * 1024


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int  # output columns per program (per half when gated)
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def block_m(num_rows: int) -> int:
    """Token rows per program: the batch up to 128 (tensor cores take 16 or more)."""
    return min(max(16, triton.next_power_of_2(num_rows)), 128)


def sweep_candidates(n: int, k: int) -> list[SkinnyConfig]:
    """The configurations the sweep tries for an ``[n, k]`` weight: column
    blocks of 64 (4 warps) or 128 (8 warps), K tiles of 64 or 128, 1-8 splits
    that divide K into whole tiles, 3 or 4 stages where 128 token rows' and
    the column block's tiles fit in shared memory."""
    out = []
    for bn in (64, 128):
        for bk in (64, 128):
            for split in (1, 2, 4, 8):
                if k % (bk * split):
                    continue
                for stages in (3, 4):
                    if (128 + bn) * bk * 2 * stages <= SMEM_BUDGET_BYTES:
                        out.append(SkinnyConfig(bn, bk, split, 4 if bn == 64 else 8, stages))
    return out


class SplitWorkspace:
    """The split programs' float32 partial sums and per-tile arrival counters
    of one device. Counters start at zero and each launch leaves them at zero;
    launches on one stream run one after another (with PDL, a launch touches
    them only after its wait for the previous kernel), so they share it."""

    def __init__(self, device: torch.device, max_tiles: int = 8192):
        self.device = device
        self.counters = torch.zeros(max_tiles, dtype=torch.int32, device=device)
        self._partials = torch.empty(0, dtype=torch.float32, device=device)

    def partials(self, numel: int) -> torch.Tensor:
        # Grown outside any CUDA graph capture: the runner warms every shape first.
        if self._partials.numel() < numel:
            self._partials = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._partials


@triton.jit
def _tile_product(x_ptr, w_ptr, rows, cols, k_start, k_len, K, row_mask, col_mask,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * K + (k_start + offs_k)[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * K + (k_start + offs_k)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, k_len, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=col_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, out_ptr, part_ptr, count_ptr, M, N, K, k_per_split, m_pad,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GATED: tl.constexpr, PDL: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    k_start = pid_k * k_per_split
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = _tile_product(x_ptr, w_ptr, rows, cols, k_start, k_per_split, K, row_mask, col_mask,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    acc_up = acc
    if GATED:
        acc_up = _tile_product(x_ptr, w_ptr, rows, cols + N, k_start, k_per_split, K, row_mask, col_mask,
                               BLOCK_M, BLOCK_N, BLOCK_K)
    if SPLIT_K > 1:
        # Partials: [split, half, m_pad, N]; m_pad covers every row block whole.
        halves = 2 if GATED else 1
        part = (rows.to(tl.int64)[:, None] * N + cols[None, :])
        own = part_ptr + pid_k * halves * m_pad * N
        tl.store(own + part, acc, mask=col_mask[None, :])
        if GATED:
            tl.store(own + m_pad * N + part, acc_up, mask=col_mask[None, :])
        tl.debug_barrier()  # every thread's partial is written before the release below
        tile = pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived != SPLIT_K - 1:
            return
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(SPLIT_K):
            base = part_ptr + s * halves * m_pad * N
            acc += tl.load(base + part, mask=col_mask[None, :], other=0.0, cache_modifier=".cg")
            if GATED:
                acc_up += tl.load(base + m_pad * N + part, mask=col_mask[None, :], other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(count_ptr + tile, 0)
    dt = out_ptr.dtype.element_ty
    y = acc.to(dt)
    if GATED:
        gate = acc.to(dt).to(tl.float32)
        y = ((gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * acc_up.to(dt).to(tl.float32)).to(dt)
    out = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, y, mask=row_mask[:, None] & col_mask[None, :])


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig, workspace: SplitWorkspace | None = None,
                *, gated: bool = False, pdl: bool = False) -> torch.Tensor:
    """``x [M, K] @ weight [N, K]^T`` -> ``[M, N]``; gated: ``weight [2I, K]``
    -> ``silu(x @ gate^T) * (x @ up^T)`` ``[M, I]``. A split config needs a
    workspace; ``config.split_k * config.block_k`` must divide K."""
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if k % (config.block_k * config.split_k):
        raise ValueError(f"K={k} is not a whole number of {config.split_k} x {config.block_k} tiles")
    x = x.contiguous()
    bm = block_m(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, config.block_n), config.split_k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part, counters = out, out
    if config.split_k > 1:
        if workspace is None or grid[0] * grid[1] > workspace.counters.numel():
            raise ValueError("a split product needs a workspace with a counter per tile")
        m_pad = grid[0] * bm
        part = workspace.partials(config.split_k * (2 if gated else 1) * m_pad * n)
        counters = workspace.counters
    _skinny_kernel[grid](
        x, weight, out, part, counters, m, n, k, k // config.split_k, grid[0] * bm,
        BLOCK_M=bm, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k, GATED=gated, PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    return out
