"""Reference attention in plain PyTorch: gathers each sequence's pages and runs SDPA.

Used on CPU and as the oracle for the GPU kernels. One SDPA call per sequence:
simple and exact, not fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pdserve.model.attention.base import AttentionBackend
from pdserve.model.forward_batch import ForwardBatch, slots_for


class TorchAttention(AttentionBackend):
    def prepare(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        plan = []
        token_start = 0
        for seq_len, ext, table in zip(batch.seq_lens, batch.extend_lens, batch.page_tables):
            kv_slots = torch.tensor(slots_for(table, 0, seq_len, self.page_size), device=device)
            mask = None
            if ext > 1:
                # Query i sits at position seq_len - ext + i and sees keys up to it.
                q_pos = torch.arange(seq_len - ext, seq_len, device=device)[:, None]
                mask = torch.arange(seq_len, device=device)[None, :] <= q_pos
            plan.append((token_start, ext, kv_slots, mask))
            token_start += ext
        batch.attn = plan

    def forward(self, batch, q, k, v, k_cache, v_cache):
        k_flat = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat[batch.out_slots] = k.to(k_flat.dtype)
        v_flat[batch.out_slots] = v.to(v_flat.dtype)
        out = torch.empty_like(q)
        for start, ext, kv_slots, mask in batch.attn:
            qs = q[start : start + ext].transpose(0, 1)  # [H, ext, D]
            ks = k_flat[kv_slots].transpose(0, 1).to(q.dtype)  # [Hkv, S, D]
            vs = v_flat[kv_slots].transpose(0, 1).to(q.dtype)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
            )
            out[start : start + ext] = o.transpose(0, 1)
        return out
