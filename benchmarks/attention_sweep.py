"""Launch configurations of the Triton attention kernels, timed on this GPU.

Decode attention (``model/kernels/decode_attention.py``) at the batches and
context of the roofline's decode rows, as a fraction of the device copy rate
(every K/V byte is read once); extend attention (``prefill_attention.py``) over
one prompt without a prefix, in TFLOP/s of its causal products. Each kernel is
timed with the configuration the product uses (``current``) and every other of
a small grid, so a better default shows as a ratio measured in the same run.
By default the L2 cache is flushed before each launch; ``--warm-cache`` times
launches replayed back to back in a CUDA graph instead, as a forward runs the
extend kernel (the layer's K/V were just written, so they sit in L2).

    python -m pdserve.benchmarks.attention_sweep --output-json out/attention-sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pdserve.common.args import add_dataclass_args, config_from_args, flag

# (query heads, kv heads, head dim) of the benchmark shapes
SHAPES = {"llama-3.2-1b": (32, 8, 64), "llama-3.1-8b": (32, 8, 128)}
# (BLOCK_N, num_warps, num_stages, splits) of decode stage 1 tried; the product's among them
DECODE_GRID = tuple(itertools.product((32, 64, 128), (4, 8), (2, 3), (1, 2)))
# ((query rows, BLOCK_N), num_warps, num_stages) of the extend kernel tried; a program's
# rows are its tokens times the query heads of one kv head
EXTEND_GRID = tuple(itertools.product(((64, 64), (128, 64), (256, 64), (64, 128), (128, 128), (256, 128)), (4, 8),
                                      (2, 3)))


@dataclass(frozen=True)
class SweepConfig:
    models: tuple[str, ...] = field(default=tuple(SHAPES), metadata=flag("model shapes", nargs="+"))
    kernels: tuple[str, ...] = field(default=("decode", "extend"), metadata=flag(
        "kernels to sweep", nargs="+", choices=("decode", "extend")))
    decode_batches: tuple[int, ...] = field(default=(128, 256), metadata=flag("decode batch sizes", nargs="+"))
    decode_context: int = field(default=768, metadata=flag("context tokens of every decode sequence"))
    prefill_lengths: tuple[int, ...] = field(default=(512, 2048, 8192), metadata=flag(
        "prompt lengths of the extend rows", nargs="+"))
    page_size: int = field(default=16, metadata=flag("tokens per KV page"))
    warm_cache: bool = field(default=False, metadata=flag(
        "time launches replayed in a CUDA graph, the cache warm, instead of each after an L2 flush"))
    output_json: str = field(default="out/attention-sweep.json", metadata=flag("result file"))


def _paged_cache(num_tokens_per_seq: int, batch: int, num_kv_heads: int, head_dim: int, page_size: int):
    import torch

    pages_per_seq = -(-num_tokens_per_seq // page_size)
    num_pages = pages_per_seq * batch
    k = torch.randn(num_pages, page_size, num_kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    perm = torch.randperm(num_pages, device="cuda").to(torch.int32)  # pages scattered as in a used pool
    indptr = torch.arange(0, num_pages + 1, pages_per_seq, dtype=torch.int32, device="cuda")
    return k, v, perm, indptr


def _num_sms() -> int:
    import torch

    return torch.cuda.get_device_properties(0).multi_processor_count


def _time_ms(fn, warm_cache: bool = False) -> float | None:
    import triton

    try:
        if warm_cache:
            return triton.testing.do_bench_cudagraph(fn, rep=50)
        return triton.testing.do_bench(fn, warmup=10, rep=50)
    except Exception as exc:  # a configuration the compiler or the device refuses
        print(f"  skipped: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
        return None


def sweep_decode(shape: tuple[int, int, int], batch: int, context: int, page_size: int, copy_bytes_per_s: float,
                 warm_cache: bool = False):
    import torch
    import triton
    from pdserve.model.kernels import decode_attention as da
    from pdserve.model.kernels.tilings import decode_tiling

    heads, kv_heads, dim = shape
    k, v, indices, indptr = _paged_cache(context, batch, kv_heads, dim, page_size)
    q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    kv_bytes = 2 * batch * context * kv_heads * dim * 2
    current = (*decode_tiling(dim), da.num_kv_splits(batch, kv_heads, _num_sms()))
    mid_o = torch.empty(batch * heads * 2 * dim, dtype=torch.float32, device="cuda")
    mid_lse = torch.empty(batch * heads * 2, dtype=torch.float32, device="cuda")
    rows = []
    for block_n, warps, stages, splits in DECODE_GRID:
        def run(block_n=block_n, warps=warps, stages=stages, splits=splits):
            da._decode_stage1[(batch * kv_heads, splits)](
                q, k, v, indptr, indices, seq_lens, out, mid_o, mid_lse, dim ** -0.5, NUM_KV_HEADS=kv_heads,
                GROUP=heads // kv_heads, GROUP_BLOCK=max(16, triton.next_power_of_2(heads // kv_heads)),
                HEAD_DIM=dim, PAGE_SIZE=page_size, BLOCK_N=block_n, NUM_SPLITS=splits, PDL=False,
                num_warps=warps, num_stages=stages)
            if splits > 1:
                da._decode_stage2[(batch * heads,)](mid_o, mid_lse, out, HEAD_DIM=dim, NUM_SPLITS=splits, PDL=False,
                                                    num_warps=2)
        ms = _time_ms(run, warm_cache)
        if ms is not None:
            rows.append({"block_n": block_n, "num_warps": warps, "num_stages": stages, "num_splits": splits, "ms": ms,
                         "fraction_of_copy": kv_bytes / (ms / 1e3) / copy_bytes_per_s,
                         "current": (block_n, warps, stages, splits) == current})
    return rows


def sweep_extend(shape: tuple[int, int, int], tokens: int, page_size: int, matmul_flops_per_s: float,
                 warm_cache: bool = False):
    import torch
    import triton
    from pdserve.model.kernels import prefill_attention as pa
    from pdserve.model.kernels.tilings import extend_tiling, group_block, query_block

    heads, kv_heads, dim = shape
    group = heads // kv_heads
    k, v, indices, indptr = _paged_cache(tokens, 1, kv_heads, dim, page_size)
    q = torch.randn(tokens, heads, dim, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    qo = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([tokens], dtype=torch.int32, device="cuda")
    flops = 4 * heads * dim * tokens * (tokens + 1) / 2  # QK^T and PV over the causal half
    current = (query_block(dim, group) * group_block(group),
               *extend_tiling(dim, group, pa._device_smem_bytes(0)))
    rows = []
    for (rows_per_program, block_n), warps, stages in EXTEND_GRID:
        block_m = max(1, rows_per_program // group_block(group))

        def run(block_m=block_m, block_n=block_n, warps=warps, stages=stages):
            pa._extend_kernel[(kv_heads, triton.cdiv(tokens, block_m), 1)](
                q, out, k, v, qo, indptr, indices, seq_lens, qo, qo, dim ** -0.5 * pa._LOG2E,
                NUM_KV_HEADS=kv_heads, GROUP=group, GROUP_BLOCK=group_block(group), HEAD_DIM=dim,
                PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n, TILED=False, num_warps=warps,
                num_stages=stages)
        ms = _time_ms(run, warm_cache)
        if ms is not None:
            rows.append({"rows": rows_per_program, "block_n": block_n, "num_warps": warps, "num_stages": stages,
                         "ms": ms, "tflops": flops / (ms / 1e3) / 1e12,
                         "fraction_of_matmul": flops / (ms / 1e3) / matmul_flops_per_s,
                         "current": (rows_per_program, block_n, warps, stages) == current})
    return rows


def _report(label: str, rows: list[dict], key: str) -> dict:
    best = max(rows, key=lambda r: r[key])
    cur = next((r for r in rows if r["current"]), None)
    gain = cur["ms"] / best["ms"] if cur else None
    print(f"{label}: current {cur and round(cur[key], 3)} best {round(best[key], 3)} "
          f"({ {k: best[k] for k in best if k.startswith(('block', 'num', 'rows'))} }), current/best time "
          f"{gain and round(gain, 2)}", flush=True)
    return {"label": label, "rows": rows, "best": best, "current": cur, "current_over_best_time": gain}


def run(cfg: SweepConfig) -> dict:
    import torch
    from pdserve.benchmarks.roofline import measure_machine

    machine = measure_machine()
    results: dict = {"gpu": machine.gpu, "machine": asdict(machine), "config": asdict(cfg), "torch": torch.__version__,
                     "command": "python -m pdserve.benchmarks.attention_sweep " + " ".join(sys.argv[1:]),
                     "decode": [], "extend": []}
    for name in cfg.models:
        shape = SHAPES[name]
        for batch in cfg.decode_batches if "decode" in cfg.kernels else ():
            rows = sweep_decode(shape, batch, cfg.decode_context, cfg.page_size, machine.copy_bytes_per_s,
                                cfg.warm_cache)
            results["decode"].append({"model": name, "batch": batch,
                                      **_report(f"{name} decode bs={batch}", rows, "fraction_of_copy")})
        for tokens in cfg.prefill_lengths if "extend" in cfg.kernels else ():
            rows = sweep_extend(shape, tokens, cfg.page_size, machine.matmul_flops_per_s, cfg.warm_cache)
            results["extend"].append({"model": name, "tokens": tokens,
                                      **_report(f"{name} extend {tokens}", rows, "tflops")})
        out = Path(cfg.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="attention_sweep", description=__doc__.split("\n")[0])
    add_dataclass_args(ap, SweepConfig)
    run(config_from_args(SweepConfig, ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
