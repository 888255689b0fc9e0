"""Matrix-vector products for single-token decode, with their neighbours fused in.

At batch 1 a decode step is a chain of matrix-vector products, each bound by
reading its weight once. Each kernel here streams ``W [N, K]`` in row tiles,
and folds the small operations around the product into the same pass:

- ``norm``: the input row is RMS-normalised in the prologue (every program
  normalises the whole row from L2; that is cheaper than a kernel boundary);
- ``gated``: rows ``[j]`` and ``[N + j]`` of a fused gate/up weight are read
  together and ``silu(gate) * up`` is written;
- ``residual``: the rounded product is added to the residual row;
- ``out_float``: logits are written as float32 after rounding to the dtype.
Rounding points follow the unfused model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from pdserve.model.kernels.tilings import cdiv, next_pow2


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    acc_2d: bool = False  # keep a [BLOCK_N, BLOCK_K] accumulator, reduce once at the end


# Fastest tilings measured on an H100 (benchmarks/roofline.py --gemv-sweep: 20
# launches chained in a CUDA graph with PDL, each on its own weight so L2 does
# not serve them, as in the model) for the benchmark shapes; keys are
# (N, K, gated). Other shapes use the heuristic.
_TUNED: dict[tuple[int, int, bool], GemvConfig] = {
    # Llama-3.2-1B: qkv, o, gate_up, down, lm_head
    (3072, 2048, False): GemvConfig(4, 1024, 4, True),
    (2048, 2048, False): GemvConfig(4, 2048, 4, False),
    (8192, 2048, True): GemvConfig(4, 1024, 4, True),
    (2048, 8192, False): GemvConfig(2, 2048, 4, True),
    (128256, 2048, False): GemvConfig(2, 2048, 4, False),
    # Qwen3-0.6B
    (4096, 1024, False): GemvConfig(8, 512, 8, True),
    (1024, 2048, False): GemvConfig(2, 2048, 4, False),
    (3072, 1024, True): GemvConfig(4, 512, 4, True),
    (1024, 3072, False): GemvConfig(4, 4096, 4, False),
    (151936, 1024, False): GemvConfig(8, 512, 4, True),
}


def sweep_candidates(k: int) -> list[GemvConfig]:
    """The tilings the tuner tries for a reduction length ``k``: row blocks of
    1-8, column tiles from 512 (1024 for long rows) to the whole row, 4 or 8
    warps, with a per-tile or a 2-D accumulator (the latter up to 8192 elements)."""
    longest = max(next_pow2(k), 512)
    out = []
    for bn in (1, 2, 4, 8):
        for bk in (512, 1024, 2048, 4096, 8192):
            if bk > longest or (k > 4096 and bk < 1024) or bn * bk > 32768:
                continue
            for warps in (4, 8):
                if bn * bk <= 8192:
                    out.append(GemvConfig(bn, bk, warps, True))
                if bk >= k or bn * bk >= 2048:
                    out.append(GemvConfig(bn, bk, warps, False))
    return out


def gemv_config(n: int, k: int, gated: bool) -> GemvConfig:
    tuned = _TUNED.get((n, k, gated))
    if tuned is not None:
        return tuned
    # What won for most tuned shapes: 2-4 rows, tiles of up to 2048 columns, 4 warps.
    block_k = min(next_pow2(k), 2048)
    block_n = 4
    while block_n > 1 and cdiv(n, block_n) < 512:
        block_n //= 2
    return GemvConfig(block_n, block_k, 4, acc_2d=block_k < k and block_n * block_k <= 8192)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, norm_ptr, bias_ptr, N, K, eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
    RESIDUAL: tl.constexpr, BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr, EVEN_K: tl.constexpr,
    ACC_2D: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    dt = w_ptr.dtype.element_ty
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows_safe = tl.where(row_mask, rows, 0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_K)
    w_off = rows_safe[:, None] * K + cols0[None, :]
    k_mask = (cols0 < K)[None, :]
    # The first weight tile does not depend on the previous kernel: with PDL it
    # streams in while that kernel finishes.
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if EVEN_K:
        w = tl.load(w_ptr + w_off)
    else:
        w = tl.load(w_ptr + w_off, mask=k_mask, other=0.0)
    w_up = w
    if GATED:
        if EVEN_K:
            w_up = tl.load(w_ptr + w_off + N * K)
        else:
            w_up = tl.load(w_ptr + w_off + N * K, mask=k_mask, other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    rstd = 1.0
    if NORM:
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xv = tl.load(x_ptr + k0 + cols0, mask=(k0 + cols0) < K, other=0.0).to(tl.float32)
            sq += xv * xv
        rstd = tl.math.rsqrt(tl.sum(sq, axis=0) / K + eps)
    if ACC_2D:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        if k0 > 0:
            if EVEN_K:
                w = tl.load(w_ptr + w_off + k0)
            else:
                w = tl.load(w_ptr + w_off + k0, mask=(cols < K)[None, :], other=0.0)
            if GATED:
                if EVEN_K:
                    w_up = tl.load(w_ptr + w_off + k0 + N * K)
                else:
                    w_up = tl.load(w_ptr + w_off + k0 + N * K, mask=(cols < K)[None, :], other=0.0)
        if EVEN_K:
            xv = tl.load(x_ptr + cols)
        else:
            xv = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        if NORM:
            nw = tl.load(norm_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            xv = ((xv.to(tl.float32) * rstd).to(dt).to(tl.float32) * nw).to(dt)
        xf = xv.to(tl.float32)[None, :]
        if ACC_2D:
            acc += w.to(tl.float32) * xf
            if GATED:
                acc_up += w_up.to(tl.float32) * xf
        else:
            acc += tl.sum(w.to(tl.float32) * xf, axis=1)
            if GATED:
                acc_up += tl.sum(w_up.to(tl.float32) * xf, axis=1)
    if ACC_2D:
        y = tl.sum(acc, axis=1)
        y_up = tl.sum(acc_up, axis=1)
    else:
        y = acc
        y_up = acc_up
    if BIAS:
        y += tl.load(bias_ptr + rows_safe).to(tl.float32)
    if GATED:
        gate = y.to(dt).to(tl.float32)
        up = y_up.to(dt).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up
    if RESIDUAL:
        y = y.to(dt).to(tl.float32) + tl.load(res_ptr + rows_safe).to(tl.float32)
    if OUT_FLOAT:
        tl.store(out_ptr + rows, y.to(dt).to(tl.float32), mask=row_mask)
    else:
        tl.store(out_ptr + rows, y.to(dt), mask=row_mask)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gated: bool = False,
    out_float: bool = False,
    config: GemvConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``x [1, K]`` times ``weight [N, K]^T`` (``[2I, K]`` when gated) -> ``[1, N]`` (``[1, I]``).

    ``pdl``: launch as a programmatic dependent of the previous kernel (Hopper):
    the first weight tile is read before waiting for that kernel's output."""
    if x.shape[0] != 1 or not weight.is_contiguous():
        raise ValueError("gemv takes one contiguous input row and a contiguous weight")
    x = x.contiguous()
    k = x.shape[-1]
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    cfg = config or gemv_config(n, k, gated)
    out = torch.empty((1, n), dtype=torch.float32 if out_float else weight.dtype, device=x.device)
    _gemv_kernel[(cdiv(n, cfg.block_n),)](
        x, weight, out, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        bias if bias is not None else x, n, k, eps,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NORM=norm_weight is not None, GATED=gated,
        RESIDUAL=residual is not None, BIAS=bias is not None, OUT_FLOAT=out_float,
        EVEN_K=k % cfg.block_k == 0, ACC_2D=cfg.acc_2d, PDL=pdl, num_warps=cfg.num_warps, launch_pdl=pdl,
    )
    return out
