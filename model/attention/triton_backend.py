"""Paged attention in our own Triton kernels: split-KV decode and causal extend.

No planning step: the metadata is the step's CSR page index, copied to the
device in one transfer. For CUDA graphs the index lives in fixed buffers and
the split count is fixed per captured batch size, so a replay only copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pdserve.model.attention.base import AttentionBackend
from pdserve.model.forward_batch import ForwardBatch
from pdserve.model.kernels.step_inputs import StepInputs, step_of, to_device


@dataclass
class TritonMeta:
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    seq_lens: torch.Tensor
    max_extend_len: int
    num_splits: int
    mid_o: torch.Tensor | None = None
    mid_lse: torch.Tensor | None = None


class TritonAttention(AttentionBackend):
    accepts_stored_kv = True
    supports_cuda_graph = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 device: torch.device, pdl: bool = False, **kwargs: Any):
        super().__init__(num_heads, num_kv_heads, head_dim, page_size, **kwargs)
        from pdserve.model.kernels import decode_attention, prefill_attention, rope_store

        self._decode, self._extend, self._store = (
            decode_attention.decode_attention, prefill_attention.extend_attention, rope_store.store_kv
        )
        self._splits_for = decode_attention.num_kv_splits
        self.device = device
        self.pdl = pdl
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        self._graph_inputs: Any = None

    def _splits(self, batch_size: int) -> int:
        return self._splits_for(batch_size, self.num_kv_heads, self.num_sms)

    def prepare(self, batch: ForwardBatch) -> None:
        step = step_of(batch, self.page_size)
        bs = step.batch_size
        packed = np.concatenate([step.qo_indptr, step.kv_indptr, step.seq_lens, step.kv_indices])
        dev = to_device(torch.from_numpy(packed), self.device)
        qo, kv, lens, indices = torch.split(dev, [bs + 1, bs + 1, bs, step.kv_indices.shape[0]])
        batch.attn = TritonMeta(qo, kv, indices, lens, step.max_extend_len, self._splits(bs))

    def forward(self, batch, q, k, v, k_cache, v_cache):
        if k is not None:
            self._store(k, v, k_cache, v_cache, batch.out_slots)
        meta: TritonMeta = batch.attn
        if batch.is_decode:
            return self._decode(q, k_cache, v_cache, meta.kv_indptr, meta.kv_indices, meta.seq_lens,
                                self.scale, meta.num_splits, meta.mid_o, meta.mid_lse, pdl=self.pdl)
        return self._extend(q, k_cache, v_cache, meta.qo_indptr, meta.kv_indptr, meta.kv_indices,
                            meta.seq_lens, meta.max_extend_len, self.scale)

    # ---- CUDA graphs ------------------------------------------------------------
    def init_graph_state(self, inputs: Any) -> None:
        """``inputs``: the graph runner's :class:`GraphInputs`; the kernels read
        the index straight from its device buffer, so a replay needs no copy here."""
        self._graph_inputs = inputs
        mid = max(b * self._splits(b) for b in range(1, inputs.max_bs + 1)) * self.num_heads
        self._mid_o = torch.empty(mid * self.head_dim, dtype=torch.float32, device=self.device)
        self._mid_lse = torch.empty(mid, dtype=torch.float32, device=self.device)

    def graph_metadata(self, step: StepInputs, batch_size: int) -> TritonMeta:
        g = self._graph_inputs
        indptr = g.device_view("kv_indptr", batch_size + 1)
        return TritonMeta(indptr, indptr, g.device_view("kv_indices", g.max_pages), g.device_view("seq_lens", batch_size),
                          1, self._splits(batch_size), self._mid_o, self._mid_lse)
