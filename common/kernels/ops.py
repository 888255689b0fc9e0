"""One implementation of the fused operations per device.

``TorchOps`` runs the references (CPU, and GPU with the ``torch`` attention
backend); ``TritonOps`` runs the Triton kernels. The model asks ``ops`` for
every fused operation, so both paths share one forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pdserve.common.kernels import reference


class TorchOps:
    name = "torch"
    fuses_rope_store = False  # the attention backend stores K/V itself
    has_gemv = False  # single-token products go through F.linear

    rmsnorm = staticmethod(reference.rmsnorm)
    add_rmsnorm = staticmethod(reference.add_rmsnorm)
    silu_mul = staticmethod(reference.silu_mul)
    rope_store = staticmethod(reference.rope_store)
    store_kv = staticmethod(reference.store_kv)


class TritonOps:
    name = "triton"
    fuses_rope_store = True
    has_gemv = True

    def __init__(self) -> None:
        from pdserve.common.kernels import elementwise, gemv, rope_store

        self.rmsnorm: Callable = elementwise.rmsnorm
        self.add_rmsnorm: Callable = elementwise.add_rmsnorm
        self.silu_mul: Callable = elementwise.silu_mul
        self.rope_store: Callable = rope_store.rope_store
        self.store_kv: Callable = rope_store.store_kv
        self.gemv: Callable = gemv.gemv


def create_ops(device: torch.device) -> TorchOps | TritonOps:
    """Triton on CUDA when it imports; the PyTorch references otherwise."""
    if device.type != "cuda":
        return TorchOps()
    try:
        return TritonOps()
    except ImportError:
        return TorchOps()
