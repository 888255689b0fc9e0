"""One implementation of the fused operations per device.

``TorchOps`` runs the references (CPU, and GPU with the ``torch`` attention
backend); ``TritonOps`` runs the Triton kernels. The model asks ``ops`` for
every fused operation, so both paths share one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from pdserve.model.kernels import reference, tilings


class TorchOps:
    name = "torch"
    fuses_rope_store = False  # the attention backend stores K/V itself
    has_gemv = False  # single-token products go through F.linear

    rmsnorm = staticmethod(reference.rmsnorm)
    add_rmsnorm = staticmethod(reference.add_rmsnorm)
    gate_up_silu = staticmethod(reference.gate_up_silu)
    rope_store = staticmethod(reference.rope_store)
    store_kv = staticmethod(reference.store_kv)


class TritonOps:
    name = "triton"
    fuses_rope_store = True
    has_gemv = True

    def __init__(self, pdl: bool = False, fused_gate_up: bool = False) -> None:
        from pdserve.model.kernels import elementwise, gate_up, gemv, rope_store

        self.pdl = pdl
        # The gate/up product with silu fused, where it was measured faster (Hopper).
        self.fused_gate_up = fused_gate_up
        self.rmsnorm: Callable = partial(elementwise.rmsnorm, pdl=pdl)
        self.add_rmsnorm: Callable = partial(elementwise.add_rmsnorm, pdl=pdl)
        self._silu_mul: Callable = partial(elementwise.silu_mul, pdl=pdl)
        self.rope_store: Callable = partial(rope_store.rope_store, pdl=pdl)
        self.store_kv: Callable = rope_store.store_kv
        self.gemv: Callable = partial(gemv.gemv, pdl=pdl)
        self._fused_gate_up_silu: Callable = partial(gate_up.gate_up_silu, pdl=pdl)

    def gate_up_silu(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``silu_mul(x @ weight^T)``: one fused kernel for the decode batches
        ``tilings.gate_up_config`` lists, cuBLAS and ``silu_mul`` otherwise."""
        n, k = weight.shape[0] // 2, weight.shape[1]
        config = tilings.gate_up_config(x.shape[0], n, k) if self.fused_gate_up and x.dim() == 2 else None
        if config is None:
            return self._silu_mul(F.linear(x, weight))
        return self._fused_gate_up_silu(x, weight, config)


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
        return TritonOps(pdl=pdl, fused_gate_up=torch.cuda.get_device_capability(device)[0] == 9)
    except ImportError:
        return TorchOps()
