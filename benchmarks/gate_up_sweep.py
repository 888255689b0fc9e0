"""The decode batch's gate/up product: cuBLAS against the fused kernel.

For the MLP of each model shape and each batch of token rows, times
``F.linear`` followed by ``silu_mul`` against every candidate configuration of
``model/kernels/gate_up.py`` (the product with silu-and-multiply fused), the
way a decode graph runs them: ``chain`` launches captured in one CUDA graph,
each on its own weight (together far larger than L2, as the model's layers
are), the fused kernel with PDL. A row reports both times, the fraction of the
device copy rate each reaches on the weight's bytes, the best configuration
(a line for the kernel's tuned table) and the one in use.

    python -m pdserve.benchmarks.gate_up_sweep --output-json out/gate-up-sweep.json
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
class GateUpSweepConfig:
    models: tuple[str, ...] = field(default=("llama-3.2-1b", "llama-3.1-8b"), metadata=flag(
        "benchmark config names", nargs="+"))
    rows: tuple[int, ...] = field(default=(64, 128, 256), metadata=flag("token rows (decode batch sizes)", nargs="+"))
    chain: int = field(default=20, metadata=flag("launches per timed graph, each on its own weight"))
    output_json: str = field(default="out/gate-up-sweep.json", metadata=flag("result file"))


def gate_up_shape(model: str) -> tuple[int, int]:
    """(I, K) of the model's fused ``[gate; up]`` weight, ``[2I, K]``."""
    from pdserve.model.config import ModelConfig

    m = ModelConfig.from_dict(json.loads((_CONFIGS / f"{model}.json").read_text()))
    return m.intermediate_size, m.hidden_size


def sweep_one(n: int, k: int, rows: int, chain: int, copy_bytes_per_s: float) -> dict:
    import torch
    import torch.nn.functional as F
    import triton
    from pdserve.benchmarks.roofline import _chained_graph_s
    from pdserve.model.kernels.elementwise import silu_mul
    from pdserve.model.kernels.gate_up import gate_up_silu
    from pdserve.model.kernels.tilings import gate_up_candidates, gate_up_config

    weights = [torch.randn((2 * n, k), dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(chain)]
    x = torch.randn((rows, k), dtype=torch.bfloat16, device="cuda")

    def cublas(w):
        return silu_mul(F.linear(x, w))

    cublas_s = _chained_graph_s(cublas, weights) / chain
    timed = []
    for c in gate_up_candidates():
        try:
            timed.append((_chained_graph_s(partial(gate_up_silu, x, config=c, pdl=True), weights) / chain, c))
        except triton.runtime.errors.OutOfResources:
            continue  # more shared memory or registers than a block has here
    timed.sort(key=lambda t: t[0])
    best_s, best = timed[0]
    in_use = gate_up_config(rows, n, k)
    error = float((gate_up_silu(x, weights[0], best).float() - cublas(weights[0]).float()).abs().max())
    nbytes = weights[0].numel() * 2
    del weights
    torch.cuda.empty_cache()
    return {"n": n, "k": k, "rows": rows, "cublas_us": cublas_s * 1e6, "fused_us": best_s * 1e6,
            "fused_over_cublas": best_s / cublas_s, "cublas_fraction": nbytes / cublas_s / copy_bytes_per_s,
            "fused_fraction": nbytes / best_s / copy_bytes_per_s, "config": asdict(best),
            "in_use": None if in_use is None else asdict(in_use),
            "in_use_us": next((s * 1e6 for s, c in timed if c == in_use), None), "max_abs_diff": error}


def run(cfg: GateUpSweepConfig) -> dict:
    """Every row, the result file rewritten after each (a sweep cut short keeps its rows)."""
    import torch
    from pdserve.benchmarks.roofline import measure_machine

    machine = measure_machine()
    out = {"gpu": torch.cuda.get_device_name(), "machine": asdict(machine), "config": asdict(cfg),
           "torch": torch.__version__, "command": "python -m pdserve.benchmarks.gate_up_sweep " + " ".join(sys.argv[1:]),
           "rows": []}
    for model in cfg.models:
        n, k = gate_up_shape(model)
        for rows in cfg.rows:
            r = {"model": model, **sweep_one(n, k, rows, cfg.chain, machine.copy_bytes_per_s)}
            out["rows"].append(r)
            _write(cfg.output_json, out)
            c = r["config"]
            print(f"{model:<14}gate_up rows {rows:<4} cublas+silu_mul {r['cublas_us']:7.2f} us "
                  f"({r['cublas_fraction']:.2f})  fused {r['fused_us']:7.2f} us ({r['fused_fraction']:.2f}) "
                  f"x{r['fused_over_cublas']:.2f}  ({rows}, {n}, {k}): GateUpConfig({c['block_n']}, "
                  f"{c['block_k']}, {c['num_warps']}, {c['num_stages']}); in use: {r['in_use']}", flush=True)
    return out


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(ap, GateUpSweepConfig)
    cfg = config_from_args(GateUpSweepConfig, ap.parse_args(argv))
    _write(cfg.output_json, run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
