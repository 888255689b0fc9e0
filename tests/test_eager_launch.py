"""The eager-launch benchmark runs the GPU code path on the CPU and counts its launches."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")  # a test dependency: the wrappers import it


def test_an_eager_layer_makes_five_triton_launches_and_nothing_runs() -> None:
    import torch
    from pdserve.benchmarks.eager_launch import EagerLaunchConfig, run
    from triton.runtime.jit import JITFunction

    linear, launch = torch.nn.functional.linear, JITFunction.run
    result = run(EagerLaunchConfig(num_layers=3, tokens=20, forwards=5, repeats=2))
    # per layer: the input norm, rotary + page store, extend attention, the
    # post-attention norm, silu_mul (the products are cuBLAS's); then the final norm
    assert result["triton_launches_per_forward"] == 3 * 5 + 1
    assert len(result["us_per_layer"]) == 2 and all(t > 0 for t in result["us_per_layer"])
    # the stubs are gone afterwards
    assert torch.nn.functional.linear is linear and JITFunction.run is launch
