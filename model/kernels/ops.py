"""One implementation of the fused operations per device.

``TorchOps`` runs the references (CPU, and GPU with the ``torch`` attention
backend); ``TritonOps`` runs the Triton kernels. The model asks ``ops`` for
every fused operation, so both paths share one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from pdserve.model.kernels import reference


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

    def __init__(self, pdl: bool = False) -> None:
        from pdserve.model.kernels import elementwise, gemv, rope_store

        self.pdl = pdl
        self.rmsnorm: Callable = elementwise.rmsnorm
        self.add_rmsnorm: Callable = elementwise.add_rmsnorm
        self.silu_mul: Callable = elementwise.silu_mul
        self.rope_store: Callable = partial(rope_store.rope_store, pdl=pdl)
        self.store_kv: Callable = rope_store.store_kv
        self.gemv: Callable = partial(gemv.gemv, pdl=pdl)


def pdl_enabled(device: torch.device, disabled: bool = False) -> bool:
    """Programmatic dependent launch between our kernels: Hopper and newer,
    unless ``--disable-pdl`` (A/B measurements)."""
    if device.type != "cuda" or disabled:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def create_ops(device: torch.device, pdl: bool = False) -> TorchOps | TritonOps:
    """Triton on CUDA when it imports; the PyTorch references otherwise."""
    if device.type != "cuda":
        return TorchOps()
    try:
        return TritonOps(pdl=pdl)
    except ImportError:
        return TorchOps()
