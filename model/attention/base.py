"""Attention backends: one interface, a registry by name.

A backend plans once per batch (``prepare``) and then, per layer, writes the
new K/V into the paged pool and attends over each sequence's pages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from pdserve.common.registry import Registry
from pdserve.model.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    # The fast path's contract: the backend stores K/V itself from the fused
    # rotary kernel's output, and its decode steps can be captured in CUDA graphs.
    accepts_stored_kv = False
    supports_cuda_graph = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, **_: object):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.scale = head_dim**-0.5

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None:
        """Plan the batch once; called before the first layer."""

    @abstractmethod
    def forward(
        self,
        batch: ForwardBatch,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store k/v at ``batch.out_slots`` and attend."""


# Lazy entries: a CPU install never imports flashinfer or triton.
ATTENTION_BACKENDS: Registry[type[AttentionBackend]] = Registry("attention backend", {
    "torch": "pdserve.model.attention.torch_backend:TorchAttention",
    "triton": "pdserve.model.attention.triton_backend:TritonAttention",
    "flashinfer": "pdserve.model.attention.flashinfer_backend:FlashInferAttention",
    "flashinfer_decode": "pdserve.model.attention.flashinfer_backend:FlashInferDecodeAttention",
})


def create_attention_backend(name: str, **kwargs: object) -> AttentionBackend:
    return ATTENTION_BACKENDS.get(name)(**kwargs)
