"""GPU kernels of the hot path (Triton) and their PyTorch references.

``reference`` holds the exact PyTorch formulation of every fused operation; it
runs on CPU and is the oracle the Triton kernels are tested against. ``ops``
picks one implementation per device. Triton is imported only by the kernel
modules, so a CPU install never needs it.
"""
