"""Every Triton kernel against its PyTorch reference, in bf16 on the GPU."""

from __future__ import annotations

import pytest
import torch
from pdserve.model.kernels import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16 = torch.bfloat16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _same_mostly(a: torch.Tensor, b: torch.Tensor, at_least: float = 0.98) -> None:
    """Rounding-faithful kernels agree bit for bit on nearly every element."""
    equal = (a == b).double().mean().item()
    assert equal >= at_least and _rel(a, b) < 5e-3, (equal, _rel(a, b))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("hidden", [1024, 2048, 3000])
def test_norms_and_silu_mul(hidden: int, pdl: bool) -> None:
    from pdserve.model.kernels import elementwise

    x, r = torch.randn(7, hidden, dtype=BF16, device="cuda"), torch.randn(7, hidden, dtype=BF16, device="cuda")
    w = (torch.rand(hidden, device="cuda") + 0.5).to(BF16)
    _same_mostly(elementwise.rmsnorm(x, w, 1e-5, pdl=pdl), reference.rmsnorm(x, w, 1e-5))
    y, res = elementwise.add_rmsnorm(x, r, w, 1e-5, pdl=pdl)
    y_ref, res_ref = reference.add_rmsnorm(x, r, w, 1e-5)
    assert torch.equal(res, res_ref)
    _same_mostly(y, y_ref)
    gu = torch.randn(5, 2 * hidden, dtype=BF16, device="cuda") * 3
    _same_mostly(elementwise.silu_mul(gu, pdl=pdl), reference.silu_mul(gu))


@pytest.mark.parametrize("heads, kv_heads, dim, qk_norm", [(32, 8, 64, False), (16, 8, 128, True), (4, 4, 64, False)])
def test_rope_store(heads: int, kv_heads: int, dim: int, qk_norm: bool) -> None:
    from pdserve.model.kernels import rope_store

    tokens, pages, page = 37, 20, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=BF16, device="cuda")
    pos = torch.randint(0, 4000, (tokens,), device="cuda")
    inv = 1.0 / (500000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    freqs = torch.outer(torch.arange(4096, device="cuda").float(), inv)
    slots = torch.randperm(pages * page, device="cuda")[:tokens]
    slots[3] = -1
    qn = (torch.rand(dim, device="cuda") + 0.5).to(BF16) if qk_norm else None
    kn = (torch.rand(dim, device="cuda") + 0.5).to(BF16) if qk_norm else None
    caches = [torch.full((pages, page, kv_heads, dim), 7.0, dtype=BF16, device="cuda") for _ in range(4)]
    q = rope_store.rope_store(qkv, pos, freqs.cos(), freqs.sin(), heads, kv_heads, caches[0], caches[1], slots, qn, kn, 1e-6)
    q_ref = reference.rope_store(qkv, pos, freqs.cos(), freqs.sin(), heads, kv_heads, caches[2], caches[3], slots, qn, kn, 1e-6)
    _same_mostly(q, q_ref)
    _same_mostly(caches[0], caches[2], at_least=0.99)
    assert torch.equal(caches[1], caches[3])
    k, v = (torch.randn(tokens, kv_heads, dim, dtype=BF16, device="cuda") for _ in range(2))
    rope_store.store_kv(k, v, caches[0], caches[1], slots)
    keep = slots >= 0
    reference.store_kv(k[keep], v[keep], caches[2], caches[3], slots[keep])
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("n, k, kind", [
    (3072, 2048, "norm"), (2048, 2048, "residual"), (8192, 2048, "gated"), (2048, 8192, "residual"),
    (128256, 2048, "logits"), (4096, 1024, "bias"), (1000, 300, "plain"),
    (1024, 2048, "residual"), (3072, 1024, "gated"), (1024, 3072, "residual"), (151936, 1024, "logits"),
    (5000, 6000, "residual"),  # untuned: the heuristic, tiles shorter than the row
])
def test_gemv(n: int, k: int, kind: str) -> None:
    from pdserve.model.kernels.gemv import gemv

    x = torch.randn(1, k, dtype=BF16, device="cuda")
    w = (torch.randn(2 * n if kind == "gated" else n, k, device="cuda") / k**0.5).to(BF16)
    nw = (torch.rand(k, device="cuda") + 0.5).to(BF16)
    res = torch.randn(1, n, dtype=BF16, device="cuda")
    bias = torch.randn(n, dtype=BF16, device="cuda")
    if kind == "norm":
        got, ref = gemv(x, w, norm_weight=nw, eps=1e-5), reference.norm_linear(x, nw, 1e-5, w)
    elif kind == "residual":
        got, ref = gemv(x, w, residual=res), reference.linear_residual(x, w, res)
    elif kind == "gated":
        got, ref = gemv(x, w, norm_weight=nw, eps=1e-5, gated=True), reference.norm_gate_up_silu(x, nw, 1e-5, w)
    elif kind == "logits":
        got, ref = gemv(x, w, norm_weight=nw, eps=1e-5, out_float=True), reference.norm_logits(x, nw, 1e-5, w)
        assert got.dtype == torch.float32
    elif kind == "bias":
        got, ref = gemv(x, w, bias=bias), torch.nn.functional.linear(x, w, bias)
    else:
        got, ref = gemv(x, w), torch.nn.functional.linear(x, w)
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-2


def _paged(num_kv_heads: int, dim: int, seq_lens: list[int], page: int = 16):
    num_pages = sum(-(-s // page) for s in seq_lens) + 3
    k_cache = torch.randn(num_pages, page, num_kv_heads, dim, dtype=BF16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_pages).tolist()
    tables, start = [], 0
    for s in seq_lens:
        n = -(-s // page)
        tables.append(perm[start : start + n])
        start += n
    indptr = torch.tensor([0] + [sum(len(t) for t in tables[: i + 1]) for i in range(len(tables))], dtype=torch.int32)
    indices = torch.tensor(sum(tables, []), dtype=torch.int32)
    return k_cache, v_cache, tables, indptr.cuda(), indices.cuda()


def _attention_ref(q, k_cache, v_cache, tables, seq_lens, ext_lens, scale):
    page, kv_heads, dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // kv_heads
    outs, t0 = [], 0
    for table, s, e in zip(tables, seq_lens, ext_lens):
        slots = torch.tensor([table[i // page] * page + i % page for i in range(s)], device="cuda")
        ks = k_cache.view(-1, kv_heads, dim)[slots].double().repeat_interleave(group, 1)
        vs = v_cache.view(-1, kv_heads, dim)[slots].double().repeat_interleave(group, 1)
        scores = torch.einsum("thd,shd->hts", q[t0 : t0 + e].double(), ks) * scale
        visible = torch.arange(s, device="cuda")[None, :] <= torch.arange(s - e, s, device="cuda")[:, None]
        outs.append(torch.einsum("hts,shd->thd", scores.masked_fill(~visible, float("-inf")).softmax(-1), vs))
        t0 += e
    return torch.cat(outs)


@pytest.mark.parametrize("heads, kv_heads, dim", [(32, 8, 64), (16, 8, 128)])
@pytest.mark.parametrize("splits", [1, 4, 32])
def test_decode_attention(heads: int, kv_heads: int, dim: int, splits: int) -> None:
    from pdserve.model.kernels.decode_attention import decode_attention

    seq_lens = [1, 17, 1024, 300, 64]
    k_cache, v_cache, tables, indptr, indices = _paged(kv_heads, dim, seq_lens)
    q = torch.randn(len(seq_lens), heads, dim, dtype=BF16, device="cuda")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    out = decode_attention(q, k_cache, v_cache, indptr, indices, lens, dim**-0.5, splits)
    ref = _attention_ref(q, k_cache, v_cache, tables, seq_lens, [1] * len(seq_lens), dim**-0.5)
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("heads, kv_heads, dim", [(32, 8, 64), (16, 8, 128), (28, 4, 128), (8, 8, 64), (16, 2, 256)])
def test_extend_attention_with_cached_prefixes(heads: int, kv_heads: int, dim: int) -> None:
    from pdserve.model.kernels.prefill_attention import extend_attention

    seq_lens, ext_lens = [100, 33, 512, 7], [100, 1, 200, 7]  # prefixes of 0, 32, 312, 0
    k_cache, v_cache, tables, indptr, indices = _paged(kv_heads, dim, seq_lens)
    q = torch.randn(sum(ext_lens), heads, dim, dtype=BF16, device="cuda")
    qo = torch.tensor([0] + [sum(ext_lens[: i + 1]) for i in range(len(ext_lens))], dtype=torch.int32, device="cuda")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    out = extend_attention(q, k_cache, v_cache, qo, indptr, indices, lens, max(ext_lens), dim**-0.5)
    ref = _attention_ref(q, k_cache, v_cache, tables, seq_lens, ext_lens, dim**-0.5)
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("heads, kv_heads, dim", [(32, 8, 64), (16, 8, 128), (28, 4, 128)])
def test_tiled_extend_attention_fills_only_covered_rows(heads: int, kv_heads: int, dim: int) -> None:
    """The fixed-grid form a prefill CUDA graph launches: spare tiles and the
    padding rows after the batch's tokens are left alone."""
    import numpy as np
    from pdserve.model.kernels.prefill_attention import extend_attention_tiled
    from pdserve.model.kernels.step_inputs import max_tiles, tile_table
    from pdserve.model.kernels.tilings import query_block

    seq_lens, ext_lens = [100, 33, 512, 7], [100, 1, 200, 7]
    k_cache, v_cache, tables, indptr, indices = _paged(kv_heads, dim, seq_lens)
    num_tokens, padded = sum(ext_lens), sum(ext_lens) + 45
    q = torch.randn(padded, heads, dim, dtype=BF16, device="cuda")
    qo_host = np.array([0] + [sum(ext_lens[: i + 1]) for i in range(len(ext_lens))], dtype=np.int32)
    block_m = query_block(dim, heads // kv_heads)
    seq, block = tile_table(qo_host, block_m, max_tiles(padded, 8, block_m))
    out = torch.full_like(q, 7.0)
    extend_attention_tiled(q, out, k_cache, v_cache, torch.from_numpy(qo_host).cuda(), indptr, indices,
                           torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
                           torch.from_numpy(seq).cuda(), torch.from_numpy(block).cuda(), dim**-0.5)
    ref = _attention_ref(q[:num_tokens], k_cache, v_cache, tables, seq_lens, ext_lens, dim**-0.5)
    assert _rel(out[:num_tokens], ref) < 1e-2
    assert bool((out[num_tokens:] == 7.0).all())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_page_copy_moves_exactly_the_listed_pages(dtype: torch.dtype) -> None:
    from pdserve.transfer.kernels.page_copy import copy_pages

    regions, page_elems = 3, 3000  # not a multiple of the block: the tail is masked
    src = torch.randint(0, 100, (regions, 7, page_elems), device="cuda").to(dtype)
    dst = torch.full((regions, 11, page_elems), 101, device="cuda").to(dtype)
    src_pages, dst_pages = [0, 3, 4, 6], [10, 2, 3, 0]
    pages = torch.tensor([src_pages, dst_pages], dtype=torch.int32, device="cuda")
    copy_pages(src.view(-1), dst.view(-1), pages[0], pages[1], regions, 7 * page_elems, 11 * page_elems, page_elems)
    want = torch.full_like(dst, 101)
    want[:, dst_pages] = src[:, src_pages]
    assert torch.equal(dst, want)


@pytest.mark.parametrize("rows, vocab", [(1, 128256), (8, 151936), (3, 32000), (2, 20011), (1, 151665), (4, 50257)])
def test_argmax_rows_matches_torch(rows: int, vocab: int) -> None:
    from pdserve.engine.sampler import argmax_rows

    logits = torch.randn(rows, vocab, device="cuda")
    logits[0, 5] = logits[0, vocab - 3] = 1e4  # the first of two maxima in different chunks
    logits[-1, vocab - 1] = 2e4  # the maximum in the last chunk or the remainder
    assert torch.equal(argmax_rows(logits), logits.argmax(-1))
    assert torch.equal(argmax_rows(logits[:, : vocab - 1]), logits[:, : vocab - 1].argmax(-1))



@pytest.mark.parametrize("m", [1, 24, 128, 200])
@pytest.mark.parametrize("n, k", [(8192, 2048), (14336, 4096), (1000, 512)])
def test_gate_up_silu(m: int, n: int, k: int) -> None:
    from pdserve.model.kernels.gate_up import gate_up_silu
    from pdserve.model.kernels.tilings import gate_up_candidates

    x = torch.randn(m, k, dtype=BF16, device="cuda")
    w = (torch.randn(2 * n, k, device="cuda") / k**0.5).to(BF16)
    ref = reference.gate_up_silu(x, w)
    for config in gate_up_candidates()[::3]:
        got = gate_up_silu(x, w, config, pdl=True)
        assert got.shape == ref.shape
        assert _rel(got, ref) < 1e-2, config


def test_ops_fuse_gate_up_only_where_tuned() -> None:
    """The decode batches of the tuned table take the fused kernel; a prompt's
    rows take cuBLAS and silu_mul; both agree with the reference."""
    from pdserve.model.kernels.ops import TritonOps

    ops = TritonOps(pdl=True, fused_gate_up=True)
    fused_calls = []
    kernel = ops._fused_gate_up_silu
    ops._fused_gate_up_silu = lambda *a: fused_calls.append(a[0].shape[0]) or kernel(*a)
    w = (torch.randn(2 * 8192, 2048, device="cuda") / 2048**0.5).to(BF16)
    for rows in (128, 512):
        x = torch.randn(rows, 2048, dtype=BF16, device="cuda")
        assert _rel(ops.gate_up_silu(x, w), reference.gate_up_silu(x, w)) < 1e-2
    assert fused_calls == [128]
