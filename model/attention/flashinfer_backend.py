"""FlashInfer paged attention, bf16: prefill with cached prefixes, and decode.

Prefill: one ``BatchPrefillWithPagedKVCacheWrapper`` planned per batch, causal
with queries aligned to the end of each sequence's KV, so prefix-cache hits
need nothing special.

Decode: ``flashinfer`` decodes with our Triton split-KV kernel (the
``triton`` backend's), which on an H100 read the KV cache about four times
faster than FlashInfer 0.6.1's tensor-core decode wrapper at batch 256 (that
wrapper runs its SM90 prefill kernels; see benchmarks/results). The
``flashinfer_decode`` backend keeps FlashInfer for decode as well: one
``BatchDecodeWithPagedKVCacheWrapper`` planned per batch, and for CUDA graphs
one wrapper per captured batch size over the graph runner's fixed index
buffers, re-planned before each replay.

New K/V normally arrive already stored by the fused rotary kernel
(``accepts_stored_kv``); when ``k``/``v`` are passed they are stored here.
"""

from __future__ import annotations

from typing import Any

import flashinfer
import torch
from pdserve.model.attention.base import AttentionBackend
from pdserve.model.attention.triton_backend import TritonAttention
from pdserve.model.forward_batch import ForwardBatch
from pdserve.model.kernels.step_inputs import StepInputs, step_of

WORKSPACE_BYTES = 256 << 20


class FlashInferAttention(AttentionBackend):
    accepts_stored_kv = True
    supports_cuda_graph = True
    flashinfer_decode = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 device: torch.device, dtype: torch.dtype, pdl: bool = False, **kwargs: Any):
        super().__init__(num_heads, num_kv_heads, head_dim, page_size, **kwargs)
        self.device, self.dtype = device, dtype
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self._decoder: TritonAttention | None = None
        if self.flashinfer_decode:
            self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True)
        else:
            self._decoder = TritonAttention(num_heads, num_kv_heads, head_dim, page_size, device=device, pdl=pdl)
        self._graph_wrappers: dict[int, Any] = {}
        self._graph_inputs: Any = None
        self._planned: torch.cuda.Event | None = None  # after the last eager plan's copies

    def _plan(self, wrapper: Any, step: StepInputs) -> None:
        # plan() queues a copy out of FlashInfer's page-locked buffer; with a
        # decode step launched ahead, the previous plan's copy may still wait
        # behind it, and must read that buffer before this plan rewrites it.
        if self._planned is not None:
            self._planned.synchronize()
        as_t = torch.from_numpy
        common = dict(q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.scale)
        if step.is_decode:
            wrapper.plan(as_t(step.kv_indptr), as_t(step.kv_indices), as_t(step.kv_last_page_len),
                         self.num_heads, self.num_kv_heads, self.head_dim, self.page_size, **common)
        else:
            wrapper.plan(as_t(step.qo_indptr), as_t(step.kv_indptr), as_t(step.kv_indices),
                         as_t(step.kv_last_page_len), self.num_heads, self.num_kv_heads, self.head_dim,
                         self.page_size, causal=True, **common)
        self._planned = torch.cuda.Event()
        self._planned.record()

    def prepare(self, batch: ForwardBatch) -> None:
        if batch.is_decode and self._decoder is not None:
            self._decoder.prepare(batch)
            return
        step = step_of(batch, self.page_size)
        wrapper = self.decode if batch.is_decode else self.prefill
        self._plan(wrapper, step)
        batch.attn = wrapper

    def forward(self, batch, q, k, v, k_cache, v_cache):
        if batch.is_decode and self._decoder is not None:
            return self._decoder.forward(batch, q, k, v, k_cache, v_cache)
        if k is not None:
            from pdserve.model.kernels.rope_store import store_kv

            store_kv(k, v, k_cache, v_cache, batch.out_slots)
        return batch.attn.run(q.contiguous(), (k_cache, v_cache))

    # ---- CUDA graphs ------------------------------------------------------------
    def init_graph_state(self, inputs: Any) -> None:
        """``inputs``: the graph runner's :class:`GraphInputs` (fixed index buffers)."""
        self._graph_inputs = inputs
        if self._decoder is not None:
            self._decoder.init_graph_state(inputs)

    def graph_metadata(self, step: StepInputs, batch_size: int) -> Any:
        """Metadata for the ``batch_size`` graph, after the runner loaded ``step``."""
        if self._decoder is not None:
            return self._decoder.graph_metadata(step, batch_size)
        g = self._graph_inputs
        wrapper = self._graph_wrappers.get(batch_size)
        if wrapper is None:
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=g.device_view("kv_indptr", batch_size + 1),
                paged_kv_indices_buffer=g.device_view("kv_indices", g.max_pages),
                paged_kv_last_page_len_buffer=g.device_view("kv_last_page_len", batch_size),
            )
            self._graph_wrappers[batch_size] = wrapper
        wrapper.plan(g.host_view("kv_indptr", batch_size + 1), g.device_view("kv_indices", g.num_indices(batch_size)),
                     g.host_view("kv_last_page_len", batch_size), self.num_heads, self.num_kv_heads, self.head_dim,
                     self.page_size, q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.scale)
        return wrapper


class FlashInferDecodeAttention(FlashInferAttention):
    """FlashInfer for decode too (tensor-core decode wrappers)."""

    flashinfer_decode = True
