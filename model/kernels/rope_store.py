"""Rotary embedding, optional per-head q/k RMSNorm, and the K/V page store, fused.

One program per token reads the token's fused qkv row once, rotates q and k
(rounding where transformers rounds), writes q for attention and writes k/v
straight into their KV slot, so no separate store kernel runs. Tokens whose
slot is negative (padding rows of a CUDA graph) are rotated but not stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pdserve.model.kernels.tilings import next_pow2


@triton.jit
def _round(x, dt):
    """Round float32 ``x`` to ``dt`` and back. For bf16 this is done with integer
    ops (ties to even): a plain round trip lets the compiler narrow the products
    and sums below to bf16 arithmetic and contract them into one FMA, which
    rounds once where transformers rounds twice."""
    if dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    return x.to(dt).to(tl.float32)


@triton.jit
def _rotate_heads(x1, x2, c, s, norm_w1, norm_w2, eps, HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr):
    """Rotate ``[heads, D/2]`` halves; cos/sin already rounded to the dtype."""
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    if QK_NORM:
        rstd = tl.math.rsqrt((tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / HEAD_DIM + eps)
        a1 = ((a1 * rstd[:, None]).to(dt).to(tl.float32) * norm_w1[None, :]).to(dt).to(tl.float32)
        a2 = ((a2 * rstd[:, None]).to(dt).to(tl.float32) * norm_w2[None, :]).to(dt).to(tl.float32)
    o1 = _round(a1 * c[None, :], dt) + _round(-a2 * s[None, :], dt)
    o2 = _round(a2 * c[None, :], dt) + _round(a1 * s[None, :], dt)
    return o1.to(dt), o2.to(dt)


@triton.jit
def _rope_store_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, q_out_ptr,
    q_norm_ptr, k_norm_ptr, stride_qkv, eps,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_BLOCK: tl.constexpr, KV_HEADS_BLOCK: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    dt = qkv_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * HALF + d).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + pos * HALF + d).to(dt).to(tl.float32)
    # Placeholders when there is no q/k norm (the weights are then unused).
    qw1 = c
    qw2 = c
    kw1 = c
    kw2 = c
    if QK_NORM:
        qw1 = tl.load(q_norm_ptr + d).to(tl.float32)
        qw2 = tl.load(q_norm_ptr + HALF + d).to(tl.float32)
        kw1 = tl.load(k_norm_ptr + d).to(tl.float32)
        kw2 = tl.load(k_norm_ptr + HALF + d).to(tl.float32)
    if PDL:  # everything above is static; the qkv row comes from the previous kernel
        tl.extra.cuda.gdc_wait()
    row = qkv_ptr + t * stride_qkv
    # q heads -> q_out
    h = tl.arange(0, HEADS_BLOCK)
    hm = (h < NUM_HEADS)[:, None]
    q_off = h[:, None] * HEAD_DIM + d[None, :]
    q1, q2 = _rotate_heads(tl.load(row + q_off, mask=hm), tl.load(row + q_off + HALF, mask=hm),
                           c, s, qw1, qw2, eps, HEAD_DIM, QK_NORM)
    q_dst = q_out_ptr + t * (NUM_HEADS * HEAD_DIM) + q_off
    tl.store(q_dst, q1, mask=hm)
    tl.store(q_dst + HALF, q2, mask=hm)
    # k heads (rotated) and v heads -> their KV slot
    slot = tl.load(slot_ptr + t).to(tl.int64)
    kh = tl.arange(0, KV_HEADS_BLOCK)
    km = ((kh < NUM_KV_HEADS) & (slot >= 0))[:, None]
    kv_off = kh[:, None] * HEAD_DIM + d[None, :]
    k_src = row + NUM_HEADS * HEAD_DIM + kv_off
    k1, k2 = _rotate_heads(tl.load(k_src, mask=km), tl.load(k_src + HALF, mask=km),
                           c, s, kw1, kw2, eps, HEAD_DIM, QK_NORM)
    slot_base = slot * (NUM_KV_HEADS * HEAD_DIM) + kv_off
    cache_dt = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + slot_base, k1.to(cache_dt), mask=km)
    tl.store(k_cache_ptr + slot_base + HALF, k2.to(cache_dt), mask=km)
    v_src = k_src + NUM_KV_HEADS * HEAD_DIM
    tl.store(v_cache_ptr + slot_base, tl.load(v_src, mask=km).to(cache_dt), mask=km)
    tl.store(v_cache_ptr + slot_base + HALF, tl.load(v_src + HALF, mask=km).to(cache_dt), mask=km)


def rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    pdl: bool = False,
) -> torch.Tensor:
    """Same contract as :func:`pdserve.model.kernels.reference.rope_store`;
    ``pdl``: launch as a programmatic dependent of the previous kernel."""
    head_dim = k_cache.shape[-1]
    num_tokens = qkv.shape[0]
    q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    qk_norm = q_norm is not None
    _rope_store_kernel[(num_tokens,)](
        qkv, positions, cos_cache, sin_cache, slots, k_cache, v_cache, q,
        q_norm if qk_norm else qkv, k_norm if qk_norm else qkv, qkv.stride(0), eps,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_BLOCK=next_pow2(num_heads), KV_HEADS_BLOCK=next_pow2(num_kv_heads),
        QK_NORM=qk_norm, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    return q


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < ROW) & (slot >= 0)
    dt = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + slot * ROW + offs, tl.load(k_ptr + t * stride_k + offs, mask=mask).to(dt), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, tl.load(v_ptr + t * stride_v + offs, mask=mask).to(dt), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Write ``k``/``v`` ``[T, Hkv, D]`` into their slots; negative slots are skipped."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    row = k_cache.shape[-2] * k_cache.shape[-1]
    k2, v2 = k.reshape(num_tokens, row), v.reshape(num_tokens, row)
    _store_kv_kernel[(num_tokens,)](k2, v2, slots, k_cache, v_cache, k2.stride(0), v2.stride(0),
                                    ROW=row, BLOCK=next_pow2(row), num_warps=4)
