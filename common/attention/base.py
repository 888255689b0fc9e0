"""Attention backends: a registry by name, one interface.

A backend plans once per batch (``prepare``) and then, per layer, writes the
new K/V into the paged pool and attends over each sequence's pages.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from pdserve.common.forward_batch import ForwardBatch

_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_attention_backend(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        _BACKENDS[name] = cls
        return cls

    return wrap


def create_attention_backend(name: str, **kwargs: object) -> AttentionBackend:
    _import_builtin_backends()
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name](**kwargs)


def _import_builtin_backends() -> None:
    # Imported here, not at module load, so a CPU install never imports flashinfer.
    from pdserve.common.attention import torch_backend  # noqa: F401

    for module in ("flashinfer_backend", "triton_backend"):
        try:
            importlib.import_module(f"pdserve.common.attention.{module}")
        except ImportError:  # GPU-only dependencies missing on this machine
            pass


class AttentionBackend(ABC):
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
