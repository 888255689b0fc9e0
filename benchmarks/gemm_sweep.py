"""Decode-batch products: cuBLAS against the skinny kernel's configurations.

For each projection of the model shapes (qkv, o, gate_up with its
silu-and-multiply, down) and each batch of token rows, times ``F.linear``
(plus ``silu_mul`` for gate_up) and every candidate of
``model/kernels/skinny_gemm.py``, the way a decode graph runs them: ``chain``
launches captured in one CUDA graph, each on its own weight (together far
larger than L2, as the model's layers are), the skinny kernels with PDL. A
row reports both times, the fraction of the device copy rate each reaches on
the weight's bytes, and the best configuration, as a line for the kernel's
tuned table.

    python -m pdserve.benchmarks.gemm_sweep --output-json out/gemm-sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from pdserve.common.args import add_dataclass_args, config_from_args, flag

_CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class GemmSweepConfig:
    models: tuple[str, ...] = field(default=("llama-3.2-1b", "llama-3.1-8b"), metadata=flag(
        "benchmark config names", nargs="+"))
    rows: tuple[int, ...] = field(default=(64, 128, 256), metadata=flag("token rows (decode batch sizes)", nargs="+"))
    chain: int = field(default=20, metadata=flag("launches per timed graph, each on its own weight"))
    output_json: str = field(default="out/gemm-sweep.json", metadata=flag("result file"))


def projections(model: str) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, gated) of one layer's products; gated N is per half."""
    from pdserve.model.config import ModelConfig

    m = ModelConfig.from_dict(json.loads((_CONFIGS / f"{model}.json").read_text()))
    q, kv, h, i = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.hidden_size, m.intermediate_size
    return [("qkv", q + 2 * kv, h, False), ("o", h, q, False), ("gate_up", i, h, True), ("down", h, i, False)]


def sweep_one(n: int, k: int, gated: bool, rows: int, chain: int, copy_bytes_per_s: float) -> dict:
    import torch
    import torch.nn.functional as F
    import triton
    from pdserve.benchmarks.roofline import _chained_graph_s
    from pdserve.model.kernels.elementwise import silu_mul
    from pdserve.model.kernels.skinny_gemm import SplitWorkspace, skinny_gemm, sweep_candidates

    weights = [torch.randn((2 * n if gated else n, k), dtype=torch.bfloat16, device="cuda") / k**0.5
               for _ in range(chain)]
    x = torch.randn((rows, k), dtype=torch.bfloat16, device="cuda")
    workspace = SplitWorkspace(x.device)

    def cublas(w):
        y = F.linear(x, w)
        return silu_mul(y) if gated else y

    cublas_s = _chained_graph_s(cublas, weights) / chain
    timed = []
    for c in sweep_candidates(n, k):
        launch = partial(skinny_gemm, x, config=c, workspace=workspace, gated=gated, pdl=True)
        try:
            timed.append((_chained_graph_s(launch, weights) / chain, c))
        except triton.runtime.errors.OutOfResources:
            continue  # more shared memory or registers than a block has here
    timed.sort(key=lambda t: t[0])
    best_s, best = timed[0]
    got, want = skinny_gemm(x, weights[0], best, workspace, gated=gated), cublas(weights[0])
    error = float((got.float() - want.float()).abs().max())
    nbytes = weights[0].numel() * 2
    del weights
    torch.cuda.empty_cache()
    return {"n": n, "k": k, "gated": gated, "rows": rows, "cublas_us": cublas_s * 1e6, "skinny_us": best_s * 1e6,
            "skinny_over_cublas": best_s / cublas_s, "cublas_fraction": nbytes / cublas_s / copy_bytes_per_s,
            "skinny_fraction": nbytes / best_s / copy_bytes_per_s, "config": asdict(best), "max_abs_diff": error,
            "runners_up": [{"us": s * 1e6, "config": asdict(c)} for s, c in timed[1:4]]}


def run(cfg: GemmSweepConfig) -> dict:
    """Every row, the result file rewritten after each (a sweep cut short keeps its rows)."""
    import torch
    from pdserve.benchmarks.roofline import measure_machine

    machine = measure_machine()
    out = {"gpu": torch.cuda.get_device_name(), "machine": asdict(machine), "config": asdict(cfg),
           "torch": torch.__version__, "command": "python -m pdserve.benchmarks.gemm_sweep " + " ".join(sys.argv[1:]),
           "rows": []}
    for model in cfg.models:
        for name, n, k, gated in projections(model):
            for rows in cfg.rows:
                r = {"model": model, "op": name, **sweep_one(n, k, gated, rows, cfg.chain, machine.copy_bytes_per_s)}
                out["rows"].append(r)
                _write(cfg.output_json, out)
                c = r["config"]
                print(f"{model:<14}{name:<8}rows {rows:<4} cublas {r['cublas_us']:7.2f} us "
                      f"({r['cublas_fraction']:.2f})  skinny {r['skinny_us']:7.2f} us ({r['skinny_fraction']:.2f}) "
                      f"x{r['skinny_over_cublas']:.2f}  ({n}, {k}, {gated}, {rows}): SkinnyConfig({c['block_n']}, "
                      f"{c['block_k']}, {c['split_k']}, {c['num_warps']}, {c['num_stages']})", flush=True)
    return out


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, GemmSweepConfig)
    cfg = config_from_args(GemmSweepConfig, ap.parse_args(argv))
    _write(cfg.output_json, run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
