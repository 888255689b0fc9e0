"""PyTorch formulations of the fused operations, rounding where Hugging Face rounds.

Each function reproduces transformers' op order and dtype casts, so a bf16 run
rounds at the same points as the reference implementation it is compared with.
The Triton kernels compute the same functions in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, cast back, then scale in the input dtype."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` (rounded to the dtype), and its normalisation."""
    total = residual + x
    return rmsnorm(total, weight, eps), total


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused ``[..., 2 * I]`` projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding; ``cos``/``sin`` are float32 ``[T, D/2]``.

    Like transformers, cos and sin are cast to the activation dtype first and
    every product and sum rounds to it.
    """
    cos = torch.cat((cos, cos), dim=-1).to(x.dtype).unsqueeze(1)  # [T, 1, D]
    sin = torch.cat((sin, sin), dim=-1).to(x.dtype).unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write token ``i``'s K/V into flat slot ``slots[i]`` of the paged caches."""
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v.to(v_cache.dtype)


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
) -> torch.Tensor:
    """Split a fused qkv row, (q/k norm), rotate, store K/V; return q ``[T, H, D]``.

    Tokens whose slot is negative (graph padding) are not stored."""
    head_dim = k_cache.shape[-1]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
    q = q.reshape(-1, num_heads, head_dim)
    k = k.reshape(-1, num_kv_heads, head_dim)
    v = v.reshape(-1, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = rmsnorm(q, q_norm, eps), rmsnorm(k, k_norm, eps)
    cos, sin = cos_cache[positions], sin_cache[positions]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    keep = slots >= 0
    store_kv(k[keep], v[keep], k_cache, v_cache, slots[keep])
    return q


def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + x @ W^T`` with the product rounded first, as an unfused model does."""
    return residual + F.linear(x, weight)


def norm_linear(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return F.linear(rmsnorm(x, norm_weight, eps), weight, bias)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``silu(x @ gate^T) * (x @ up^T)`` of a fused ``[gate; up]`` weight."""
    return silu_mul(F.linear(x, weight))


def norm_gate_up_silu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    return gate_up_silu(rmsnorm(x, norm_weight, eps), weight)


def norm_logits(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """Float32 logits of the normalised rows, rounded to the model dtype first."""
    return F.linear(rmsnorm(x, norm_weight, eps), weight).float()


def extend_attention_tiled(
    q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor, kv_indices: torch.Tensor, seq_lens: torch.Tensor, tile_seq: torch.Tensor,
    tile_block: torch.Tensor, scale: float, block_m: int,
) -> torch.Tensor:
    """The tiled extend kernel's contract: each tile (sequence ``s >= 0``,
    query block ``b``) fills rows ``b * block_m ...`` of sequence ``s``'s new
    tokens with causal attention over its pages; rows no tile covers keep
    what ``out`` held."""
    page_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    qo, kv_ptr, pages, lens = qo_indptr.tolist(), kv_indptr.tolist(), kv_indices.tolist(), seq_lens.tolist()
    for s, b in zip(tile_seq.tolist(), tile_block.tolist()):
        if s < 0:
            continue
        q_len, seq_len = qo[s + 1] - qo[s], lens[s]
        rows = range(b * block_m, min((b + 1) * block_m, q_len))
        table = pages[kv_ptr[s] : kv_ptr[s + 1]]
        slots = torch.tensor([table[i // page_size] * page_size + i % page_size for i in range(seq_len)])
        keys = k_cache.view(-1, num_kv_heads, head_dim)[slots].float().repeat_interleave(group, 1)
        values = v_cache.view(-1, num_kv_heads, head_dim)[slots].float().repeat_interleave(group, 1)
        queries = q[qo[s] + rows.start : qo[s] + rows.stop].float()
        scores = torch.einsum("thd,shd->hts", queries, keys) * scale
        q_pos = torch.arange(rows.start, rows.stop) + (seq_len - q_len)
        scores = scores.masked_fill(torch.arange(seq_len)[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[qo[s] + rows.start : qo[s] + rows.stop] = torch.einsum("hts,shd->thd", scores.softmax(-1), values).to(out.dtype)
    return out
