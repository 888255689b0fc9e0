"""Paged decode attention: one query token per sequence, grouped query heads.

Stage 1: program ``(sequence x kv head, split)`` attends the split's share of
the sequence's pages with all ``G`` query heads of that kv head at once (one
``[G, D] x [D, BLOCK_N]`` product per tile, so every K/V byte is read once per
group). The kv heads of one sequence are neighbouring programs, so they run
together and read each page's rows (all heads of a token side by side) at
about the same time: 1-3% faster on an H100 than sequences side by side.
With one split it writes the output directly; otherwise it writes a partial
output and its log-sum-exp, and stage 2 merges the splits. The number
of splits is fixed per launch shape, so the launch is CUDA-graph safe: a split
that has no tokens writes ``-inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pdserve.model.kernels.tilings import cdiv, decode_tiling, next_pow2

MAX_SPLITS = 32


def num_kv_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Enough splits to give every SM about two programs at small batch."""
    want = cdiv(2 * num_sms, max(batch_size * num_kv_heads, 1))
    return max(1, min(MAX_SPLITS, next_pow2(want)))


@triton.jit
def _decode_stage1(
    q_ptr, k_cache_ptr, v_cache_ptr, kv_indptr_ptr, kv_indices_ptr, seq_lens_ptr,
    out_ptr, mid_o_ptr, mid_lse_ptr, scale,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    b = (pid // NUM_KV_HEADS).to(tl.int64)
    kvh = pid % NUM_KV_HEADS
    split = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    page_start = tl.load(kv_indptr_ptr + b).to(tl.int64)
    if PDL:  # q and the newest K/V slot come from the previous kernel
        tl.extra.cuda.gdc_wait()
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, GROUP_BLOCK)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    num_heads = NUM_KV_HEADS * GROUP
    q = tl.load(q_ptr + (b * num_heads + heads)[:, None] * HEAD_DIM + d[None, :], mask=g_mask[:, None], other=0.0)

    m = tl.full([GROUP_BLOCK], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([GROUP_BLOCK], dtype=tl.float32)
    acc = tl.zeros([GROUP_BLOCK, HEAD_DIM], dtype=tl.float32)
    row = NUM_KV_HEADS * HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        page = tl.load(kv_indices_ptr + page_start + n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + n % PAGE_SIZE
        kv_off = slot[:, None] * row + kvh * HEAD_DIM + d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    has_work = end > start
    safe_l = tl.where(l_sum > 0, l_sum, 1.0)
    o = acc / safe_l[:, None]
    if NUM_SPLITS == 1:
        out_off = (b * num_heads + heads)[:, None] * HEAD_DIM + d[None, :]
        tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        mid = (b * num_heads + heads) * NUM_SPLITS + split
        tl.store(mid_o_ptr + mid[:, None] * HEAD_DIM + d[None, :], o, mask=g_mask[:, None])
        lse = tl.where(has_work, m + tl.log(safe_l), float("-inf"))
        tl.store(mid_lse_ptr + mid, lse, mask=g_mask)


@triton.jit
def _decode_stage2(mid_o_ptr, mid_lse_ptr, out_ptr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    bh = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(mid_lse_ptr + bh * NUM_SPLITS + sp)
    o = tl.load(mid_o_ptr + (bh * NUM_SPLITS + sp)[:, None] * HEAD_DIM + d[None, :])
    m = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - m), 0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + bh * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [pages, page_size, Hkv, D]
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,  # [B + 1] int32, in pages
    kv_indices: torch.Tensor,  # int32 page ids
    seq_lens: torch.Tensor,  # [B] int32, >= 1
    scale: float,
    num_splits: int,
    mid_o: torch.Tensor | None = None,  # [B * H * num_splits * D] float32 scratch
    mid_lse: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    if num_splits > 1:
        need = batch * num_heads * num_splits
        if mid_o is None or mid_o.numel() < need * head_dim:
            mid_o = torch.empty(need * head_dim, dtype=torch.float32, device=q.device)
            mid_lse = torch.empty(need, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out
    block_n, warps, stages = decode_tiling(head_dim)
    _decode_stage1[(batch * num_kv_heads, num_splits)](
        q.contiguous(), k_cache, v_cache, kv_indptr, kv_indices, seq_lens, out, mid_o, mid_lse, scale,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_BLOCK=max(16, next_pow2(group)),
        HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, PDL=pdl, num_warps=warps, num_stages=stages, launch_pdl=pdl,
    )
    if num_splits > 1:
        _decode_stage2[(batch * num_heads,)](mid_o, mid_lse, out, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
                                             PDL=pdl, num_warps=2, launch_pdl=pdl)
    return out
