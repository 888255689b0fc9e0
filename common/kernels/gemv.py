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


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


# Measured on an H100 (benchmarks/roofline.py --gemv-sweep); keys are (N, K, gated).
_TUNED: dict[tuple[int, int, bool], GemvConfig] = {}


def gemv_config(n: int, k: int, gated: bool) -> GemvConfig:
    tuned = _TUNED.get((n, k, gated))
    if tuned is not None:
        return tuned
    block_k = min(triton.next_power_of_2(k), 1024 if gated else 2048)
    block_n = 4 if gated else 8
    # Keep several waves of programs on the chip so that the tail wave is short.
    while block_n > 1 and triton.cdiv(n, block_n) < 1024:
        block_n //= 2
    return GemvConfig(block_n, block_k, 4)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, norm_ptr, bias_ptr, N, K, eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
    RESIDUAL: tl.constexpr, BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    dt = w_ptr.dtype.element_ty
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows_safe = tl.where(row_mask, rows, 0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_K)
    rstd = 1.0
    if NORM:
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xv = tl.load(x_ptr + k0 + cols0, mask=(k0 + cols0) < K, other=0.0).to(tl.float32)
            sq += xv * xv
        rstd = tl.math.rsqrt(tl.sum(sq, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        if EVEN_K:
            xv = tl.load(x_ptr + cols)
        else:
            xv = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        if NORM:
            nw = tl.load(norm_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            xv = ((xv.to(tl.float32) * rstd).to(dt).to(tl.float32) * nw).to(dt)
        xf = xv.to(tl.float32)[None, :]
        w_off = rows_safe[:, None] * K + cols[None, :]
        if EVEN_K:
            w = tl.load(w_ptr + w_off)
        else:
            w = tl.load(w_ptr + w_off, mask=(cols < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * xf
        if GATED:
            if EVEN_K:
                w_up = tl.load(w_ptr + w_off + N * K)
            else:
                w_up = tl.load(w_ptr + w_off + N * K, mask=(cols < K)[None, :], other=0.0)
            acc_up += w_up.to(tl.float32) * xf
    y = tl.sum(acc, axis=1)
    if BIAS:
        y += tl.load(bias_ptr + rows_safe).to(tl.float32)
    if GATED:
        gate = y.to(dt).to(tl.float32)
        up = tl.sum(acc_up, axis=1).to(dt).to(tl.float32)
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
) -> torch.Tensor:
    """``x [1, K]`` times ``weight [N, K]^T`` (``[2I, K]`` when gated) -> ``[1, N]`` (``[1, I]``)."""
    if x.shape[0] != 1 or not weight.is_contiguous():
        raise ValueError("gemv takes one contiguous input row and a contiguous weight")
    x = x.contiguous()
    k = x.shape[-1]
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    cfg = config or gemv_config(n, k, gated)
    out = torch.empty((1, n), dtype=torch.float32 if out_float else weight.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, out, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        bias if bias is not None else x, n, k, eps,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NORM=norm_weight is not None, GATED=gated,
        RESIDUAL=residual is not None, BIAS=bias is not None, OUT_FLOAT=out_float,
        EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps,
    )
    return out
