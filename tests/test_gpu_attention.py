"""The GPU attention backends against the PyTorch reference backend, on one
mixed batch: fresh prompts, prompts extending a cached prefix, and decode."""

from __future__ import annotations

import pytest
import torch
from pdserve.model.attention.base import create_attention_backend
from pdserve.model.forward_batch import build_forward_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PAGE = 16


def _backends() -> list[str]:
    names = ["triton"]
    try:
        import flashinfer  # noqa: F401

        names += ["flashinfer", "flashinfer_decode"]
    except ImportError:
        pass
    return names


def _make(name: str, heads: int, kv_heads: int, dim: int):
    if name == "triton":
        from pdserve.model.attention import triton_backend  # noqa: F401  (registers it)
    return create_attention_backend(name, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, page_size=PAGE,
                                    device=torch.device("cuda"), dtype=torch.bfloat16)


def _run(backend, is_decode, chunks, starts, tables, q, k, v, kv):
    fb = build_forward_batch(is_decode, chunks, starts, tables, PAGE, torch.device("cuda"))
    backend.prepare(fb)
    return backend.forward(fb, q, k, v, kv[0], kv[1])


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("heads, kv_heads, dim", [(32, 8, 64), (16, 8, 128)])
def test_backend_matches_torch(name: str, heads: int, kv_heads: int, dim: int) -> None:
    torch.manual_seed(0)
    fast, ref = _make(name, heads, kv_heads, dim), _make("torch", heads, kv_heads, dim)
    prefix, lens = 48, [70, 48 + 21, 5]  # seq 1 extends a 48-token cached prefix
    tables = [list(range(0, 5)), list(range(10, 16)), list(range(20, 21))]
    kv = torch.randn(2, 32, PAGE, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    kv_ref = kv.clone()
    chunks = [[0] * lens[0], [0] * 21, [0] * lens[2]]
    starts = [0, prefix, 0]
    t = sum(map(len, chunks))
    q, k, v = (torch.randn(t, h, dim, dtype=torch.bfloat16, device="cuda") for h in (heads, kv_heads, kv_heads))
    out = _run(fast, False, chunks, starts, tables, q, k, v, kv)
    want = _run(ref, False, chunks, starts, tables, q, k, v, kv_ref)
    assert torch.equal(kv, kv_ref), "new K/V must land in the same slots"
    assert ((out.double() - want.double()).norm() / want.double().norm()) < 1e-2
    # one decode step for every sequence
    chunks, starts = [[0]] * 3, [70, 69, 5]
    q, k, v = (torch.randn(3, h, dim, dtype=torch.bfloat16, device="cuda") for h in (heads, kv_heads, kv_heads))
    out = _run(fast, True, chunks, starts, tables, q, k, v, kv)
    want = _run(ref, True, chunks, starts, tables, q, k, v, kv_ref)
    assert torch.equal(kv, kv_ref)
    assert ((out.double() - want.double()).norm() / want.double().norm()) < 1e-2
