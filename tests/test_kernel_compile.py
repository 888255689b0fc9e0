"""Every Triton kernel compiles for Hopper as the product launches it, on CPU.

The launch wrappers run on CPU tensors of the benchmark shapes; each launch
they make is caught (``JITFunction.run``) and compiled by Triton's own
compiler and ptxas for sm_90 (PDL where the product asks for it) instead of
run, with the argument specialization the JIT applies on a GPU. A kernel
edit that does not compile, a launch that needs more shared memory than an
H100 block has, or one that spills registers, fails here in CI rather than
on a GPU machine. Numerical agreement stays with the GPU tests (``test_gpu_kernels``).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton  # a test dependency (pyproject's test extra): the CPU torch wheel does not pull it
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)
H100_SMEM_PER_BLOCK = 232448  # bytes a block may opt in to
# (query heads, kv heads, head dim): Llama-3.2-1B, Llama-3.1-8B, a group of 7, heads of 256
SHAPES = [(32, 8, 64), (32, 8, 128), (28, 4, 128), (16, 2, 256)]
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "launch_pdl", "maxnreg")
BF16 = torch.bfloat16


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def bind(self) -> tuple[dict, dict, dict, dict]:
        """(signature, constexprs, attributes, compile options) as the JIT binds this launch on a GPU:
        Triton's own binder, for Hopper, so pointers 16-byte aligned and integers divisible by 16
        carry that hint (it decides vector widths and asynchronous copies, hence the pipeline's
        shared memory) and integers equal to 1 become constants."""
        # create_function_from_signature and _pack_args are Triton's internals; the test extra pins Triton.
        backend = make_backend(HOPPER)
        binder = create_function_from_signature(self.kernel.signature, self.kernel.params, backend)
        bound, specialization, options = binder(*self.args, **self.kwargs)
        _, signature, constexprs, attrs = self.kernel._pack_args(backend, self.kwargs, bound, specialization, options)
        return signature, constexprs, attrs, {k: v for k, v in self.kwargs.items() if k in _OPTIONS}

    def key(self) -> tuple:
        return (self.name, *(tuple(sorted((str(k), str(v)) for k, v in d.items())) for d in self.bind()))

    def compile(self):
        signature, constexprs, attrs, options = self.bind()
        return triton.compile(ASTSource(fn=self.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=HOPPER, options=options)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[Launch]:
    caught: list[Launch] = []

    def catch(self, *args, grid, warmup, **kwargs):
        caught.append(Launch(self, args, kwargs))

    monkeypatch.setattr(JITFunction, "run", catch)
    # what the wrappers would ask the device
    from pdserve.model.kernels import prefill_attention

    monkeypatch.setattr(prefill_attention, "_device_smem_bytes", lambda index: H100_SMEM_PER_BLOCK)
    return caught


@dataclass
class Usage:
    """The most any launch of a kernel needs."""

    shared_bytes: int = 0
    registers: int = 0  # per thread


def _registers_and_spills(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes: register spills) a thread of this kernel uses, from
    the CUDA toolkit's ``cuobjdump`` that Triton ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return int(registers), int(stack)


def _compile_all(launches: list[Launch], spills_allowed: bool = False) -> dict[str, Usage]:
    """Compile each distinct launch for sm_90; what each kernel needs at most.
    Unless ``spills_allowed``, no launch may spill registers to the stack (local memory
    traffic that a tile or warp count change can bring in silently)."""
    assert launches, "no launch was caught"
    done, usage = set(), {}
    for launch in launches:
        if launch.key() in done:
            continue
        done.add(launch.key())
        compiled = launch.compile()
        assert "cubin" in compiled.asm, launch.name
        registers, spilled = _registers_and_spills(compiled.asm["cubin"])
        assert spills_allowed or spilled == 0, (launch.name, launch.kwargs, spilled)
        most = usage.setdefault(launch.name, Usage())
        most.shared_bytes = max(most.shared_bytes, compiled.metadata.shared)
        most.registers = max(most.registers, registers)
    for name, most in usage.items():
        assert most.shared_bytes <= H100_SMEM_PER_BLOCK, (name, most)
    return usage


def _paged(num_pages: int, kv_heads: int, dim: int, page: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.zeros(num_pages, page, kv_heads, dim, dtype=BF16)
    return k, torch.zeros_like(k)


@pytest.mark.parametrize("heads, kv_heads, dim", SHAPES)
def test_attention_kernels_compile(launches: list[Launch], heads: int, kv_heads: int, dim: int) -> None:
    from pdserve.model.kernels import decode_attention, prefill_attention, rope_store
    from pdserve.model.kernels.step_inputs import max_tiles, tile_table
    from pdserve.model.kernels.tilings import query_block

    k_cache, v_cache = _paged(64, kv_heads, dim)
    i32 = torch.int32
    for pdl in (False, True):
        for splits in (1, 4):
            decode_attention.decode_attention(torch.zeros(8, heads, dim, dtype=BF16), k_cache, v_cache,
                                              torch.zeros(9, dtype=i32), torch.zeros(64, dtype=i32),
                                              torch.ones(8, dtype=i32), dim**-0.5, splits, pdl=pdl)
        for qk_norm in (False, True):
            norm = torch.ones(dim, dtype=BF16) if qk_norm else None
            qkv = torch.zeros(16, (heads + 2 * kv_heads) * dim, dtype=BF16)
            cos = torch.zeros(4096, dim // 2, dtype=torch.float32)
            rope_store.rope_store(qkv, torch.zeros(16, dtype=torch.int64), cos, cos, heads, kv_heads, k_cache,
                                  v_cache, torch.zeros(16, dtype=torch.int64), norm, norm, pdl=pdl)
    kv = torch.zeros(16, kv_heads, dim, dtype=BF16)
    rope_store.store_kv(kv, kv, k_cache, v_cache, torch.zeros(16, dtype=torch.int64))
    q = torch.zeros(100, heads, dim, dtype=BF16)
    qo, lens = torch.tensor([0, 100], dtype=i32), torch.tensor([300], dtype=i32)
    prefill_attention.extend_attention(q, k_cache, v_cache, qo, torch.tensor([0, 19], dtype=i32),
                                       torch.zeros(19, dtype=i32), lens, 100, dim**-0.5)
    block_m = query_block(dim, heads // kv_heads)
    seq, block = tile_table(qo.numpy(), block_m, max_tiles(128, 4, block_m))
    prefill_attention.extend_attention_tiled(q, torch.empty_like(q), k_cache, v_cache, qo,
                                             torch.tensor([0, 19], dtype=i32), torch.zeros(19, dtype=i32), lens,
                                             torch.from_numpy(seq), torch.from_numpy(block), dim**-0.5)
    # heads of 256 (no benchmark shape) spill 16 bytes in decode stage 1
    usage = _compile_all(launches, spills_allowed=dim > 128)
    assert {"_decode_stage1", "_decode_stage2", "_rope_store_kernel", "_store_kv_kernel", "_extend_kernel"} <= set(usage)
    if dim == 64:
        # Eight programs of 128 threads resident per SM need <= 64 registers a thread: with
        # seven, the 1024 programs of a decode batch of 128 (8 kv heads) no longer fit one wave
        # of an H100's 132 SMs.
        assert usage["_decode_stage1"].registers <= 64, usage["_decode_stage1"]


@pytest.mark.parametrize("hidden, inter", [(2048, 8192), (4096, 14336)])
def test_dense_kernels_compile(launches: list[Launch], hidden: int, inter: int) -> None:
    from pdserve.model.kernels import elementwise, gate_up, gemv
    from pdserve.model.kernels.tilings import GATE_UP_TUNED, gate_up_candidates

    x = torch.zeros(4, hidden, dtype=BF16)
    w = torch.ones(hidden, dtype=BF16)
    for pdl in (False, True):
        elementwise.rmsnorm(x, w, 1e-5, pdl=pdl)
        elementwise.add_rmsnorm(x, x.clone(), w, 1e-5, pdl=pdl)
        elementwise.silu_mul(torch.zeros(4, 2 * inter, dtype=BF16), pdl=pdl)
        row, weight, gate_up_w = x[:1], torch.zeros(hidden, hidden, dtype=BF16), torch.zeros(2 * inter, hidden, dtype=BF16)
        gemv.gemv(row, weight, pdl=pdl)
        gemv.gemv(row, weight, norm_weight=w, bias=torch.zeros(hidden, dtype=BF16), pdl=pdl)
        gemv.gemv(row, weight, residual=row, pdl=pdl)
        gemv.gemv(row, gate_up_w, norm_weight=w, gated=True, pdl=pdl)
        gemv.gemv(torch.zeros(1, inter, dtype=BF16), torch.zeros(hidden, inter, dtype=BF16), residual=row, pdl=pdl)
        gemv.gemv(row, torch.zeros(1000, hidden, dtype=BF16), norm_weight=w, out_float=True, pdl=pdl)
        for (rows, n, k), config in GATE_UP_TUNED.items():
            if (n, k) == (inter, hidden):
                gate_up.gate_up_silu(torch.zeros(rows, hidden, dtype=BF16), gate_up_w, config, pdl=pdl)
    if hidden == 2048:  # every configuration the gate/up sweep may pick fits a block's shared memory
        for config in gate_up_candidates():
            gate_up.gate_up_silu(torch.zeros(128, hidden, dtype=BF16), gate_up_w, config, pdl=True)
    usage = _compile_all(launches)
    assert {"_rmsnorm_kernel", "_silu_mul_kernel", "_gemv_kernel", "_gate_up_silu_kernel"} <= set(usage)


def test_transfer_kernels_compile(launches: list[Launch]) -> None:
    from pdserve.transfer.kernels import page_copy, ring_record

    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        buf = torch.zeros(3 * 7 * 100, dtype=dtype)
        pages = torch.tensor([0, 3], dtype=torch.int32)
        page_copy.copy_pages(buf, buf.clone(), pages, pages, 3, 700, 700, 100)
    ring_record.store_record(torch.zeros(8, dtype=torch.int32), [1, 2**40, 3, 4], None)  # None: the current stream
    assert set(_compile_all(launches)) == {"_copy_pages_kernel", "_store_record_kernel"}


def test_a_kernel_that_cannot_compile_fails_here(launches: list[Launch]) -> None:
    """The check itself: a launch that binds a float where the kernel does pointer arithmetic is refused."""
    from pdserve.transfer.kernels import page_copy

    pages = torch.tensor([0], dtype=torch.int32)
    page_copy.copy_pages(torch.zeros(100, dtype=torch.int32), torch.zeros(100, dtype=torch.int32), pages, pages, 1,
                         100, 100, 100)
    launches[0].args = (1.5, *launches[0].args[1:])
    with pytest.raises(triton.CompilationError):
        _compile_all(launches)
