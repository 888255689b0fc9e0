"""Paged prefill (extend) attention with a causal mask over cached prefixes.

Program ``(kv head, query block, sequence)``: the new tokens of a sequence sit
at positions ``prefix .. seq_len - 1`` and attend every cached key up to their
own position, read from the pages (the new K/V are already stored). One
online-softmax pass, FlashAttention style, in base 2. A program takes a block
of tokens for all query heads of one kv head at once (``GROUP`` rows per
token), so each K/V tile is read once per group, not once per query head; the
keys below the block's first position need no mask and take the unmasked loop.
Blocks beyond a sequence's new tokens exit at once.

The tiled form (:func:`extend_attention_tiled`) takes a fixed grid of query
tiles and reads each tile's (sequence, query block) from a table, so its
launch does not depend on the batch: a CUDA graph captured for a token
count serves every batch of that many tokens. Tiles past the table's end
(sequence -1) exit at once. A tile is ``query_block(head_dim, group)`` tokens.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from pdserve.model.kernels.tilings import cdiv, extend_tiling, group_block, query_block

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(acc, m, l_sum, q, q_pos, n0, k_cache_ptr, v_cache_ptr, kv_indices_ptr, page_start, kv_col, d,
                 qk_scale, end, ROW: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr):
    """One online-softmax step over keys ``n0 .. n0 + BLOCK_N``, in base 2.
    Unmasked tiles lie wholly below every row's position (and below ``end``)."""
    n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        n_mask = n < end
        page = tl.load(kv_indices_ptr + page_start + n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    else:
        page = tl.load(kv_indices_ptr + page_start + n // PAGE_SIZE).to(tl.int64)
    kv_off = (page * PAGE_SIZE + n % PAGE_SIZE)[:, None] * ROW + kv_col + d[None, :]
    if MASKED:
        k = tl.load(k_cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_off)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where(n_mask[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m - m_new)
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
    else:
        v = tl.load(v_cache_ptr + kv_off)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_sum


@triton.jit
def _extend_kernel(
    q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, seq_lens_ptr,
    tile_seq_ptr, tile_block_ptr,
    qk_scale, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILED: tl.constexpr,
):
    # Programs run heaviest first (the last query blocks see the most keys), so the
    # causal tail does not land on the last wave. Rows are token-major: row r is
    # token r // GROUP_BLOCK, head r % GROUP_BLOCK of the kv head's group.
    kvh = tl.program_id(0)
    last = tl.num_programs(1) - 1 - tl.program_id(1)
    if TILED:
        b = tl.load(tile_seq_ptr + last)
        mb = tl.load(tile_block_ptr + last)
        if b < 0:
            return
    else:
        b = tl.program_id(2)
        mb = last
    q_start = tl.load(qo_indptr_ptr + b)
    q_len = tl.load(qo_indptr_ptr + b + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len
    page_start = tl.load(kv_indptr_ptr + b).to(tl.int64)
    num_heads = NUM_KV_HEADS * GROUP
    d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, BLOCK_M * GROUP_BLOCK)
    m_idx = mb * BLOCK_M + r // GROUP_BLOCK
    g = r % GROUP_BLOCK
    row_mask = (m_idx < q_len) & (g < GROUP)
    tok = (q_start + m_idx).to(tl.int64)
    q_off = (tok * num_heads + kvh * GROUP + g)[:, None] * HEAD_DIM + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask[:, None], other=0.0)
    q_pos = prefix + m_idx

    m = tl.full([BLOCK_M * GROUP_BLOCK], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M * GROUP_BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_BLOCK, HEAD_DIM], dtype=tl.float32)
    row = NUM_KV_HEADS * HEAD_DIM
    kv_col = kvh * HEAD_DIM
    # Keys below the block's first position are visible to every row: no mask there.
    first_pos = prefix + mb * BLOCK_M
    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N
    end = tl.minimum(seq_len, first_pos + BLOCK_M)
    for n0 in range(0, unmasked_end, BLOCK_N):
        acc, m, l_sum = _attend_tile(acc, m, l_sum, q, q_pos, n0, k_cache_ptr, v_cache_ptr, kv_indices_ptr,
                                     page_start, kv_col, d, qk_scale, end, row, PAGE_SIZE, BLOCK_N, False)
    for n0 in range(unmasked_end, end, BLOCK_N):
        acc, m, l_sum = _attend_tile(acc, m, l_sum, q, q_pos, n0, k_cache_ptr, v_cache_ptr, kv_indices_ptr,
                                     page_start, kv_col, d, qk_scale, end, row, PAGE_SIZE, BLOCK_N, True)
    o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + q_off, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def extend_attention(
    q: torch.Tensor,  # [T, H, D], sequences back to back
    k_cache: torch.Tensor,  # [pages, page_size, Hkv, D]
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,  # [B + 1] int32
    kv_indptr: torch.Tensor,  # [B + 1] int32, in pages
    kv_indices: torch.Tensor,
    seq_lens: torch.Tensor,  # [B] int32
    max_extend_len: int,
    scale: float,
) -> torch.Tensor:
    num_tokens = q.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    block_m = query_block(q.shape[2], q.shape[1] // k_cache.shape[2])
    grid = (k_cache.shape[2], cdiv(max_extend_len, block_m), seq_lens.shape[0])
    _launch(grid, q, out, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, seq_lens, qo_indptr, qo_indptr,
            scale, tiled=False)
    return out


def extend_attention_tiled(
    q: torch.Tensor,  # [T, H, D]; rows no tile covers are left as they are
    out: torch.Tensor,  # like q
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    tile_seq: torch.Tensor,  # [num_tiles] int32, from :func:`tile_table`
    tile_block: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """:func:`extend_attention` over a fixed grid of ``len(tile_seq)`` tiles,
    into ``out``; nothing here depends on the host's view of the batch."""
    _launch((k_cache.shape[2], tile_seq.shape[0], 1), q, out, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices,
            seq_lens, tile_seq, tile_block, scale, tiled=True)
    return out


@functools.cache
def _device_smem_bytes(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024


def _launch(grid, q, out, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, seq_lens, tile_seq, tile_block,
            scale: float, tiled: bool) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_n, warps, stages = extend_tiling(head_dim, group, _device_smem_bytes(q.device.index or 0))
    _extend_kernel[grid](
        q.contiguous(), out, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, seq_lens, tile_seq, tile_block,
        scale * _LOG2E, NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_BLOCK=group_block(group), HEAD_DIM=head_dim,
        PAGE_SIZE=page_size, BLOCK_M=query_block(head_dim, group), BLOCK_N=block_n, TILED=tiled, num_warps=warps,
        num_stages=stages,
    )
