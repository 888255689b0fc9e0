"""The host's own Python in an eager prefill forward, on the CPU.

An eager forward on a GPU costs the host about the same per layer whatever
the prompt's length: Python in the model and the launch wrappers, then
Triton's and cuBLAS's launches. This takes the GPU code path (the Triton
ops, the Triton attention backend's extend wrapper) on a CPU with every
Triton launch caught and every product replaced by an empty result, so
what is timed is what our code adds before the launches: the part a change
to the wrappers or the model's forward moves. The model has a real shape's
layer count (``--num-layers``) and tiny widths. It also counts the Triton
launches per layer, which each cost the host ~20-30 us more on a GPU.

    python -m pdserve.benchmarks.eager_launch --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from unittest import mock

from pdserve.common.args import add_dataclass_args, config_from_args, flag


@dataclass(frozen=True)
class EagerLaunchConfig:
    num_layers: int = field(default=16, metadata=flag("decoder layers (16: the Llama-3.2-1B shape)"))
    tokens: int = field(default=64, metadata=flag("prompt tokens of the one sequence"))
    forwards: int = field(default=1000, metadata=flag("timed forwards per run"))
    repeats: int = field(default=3, metadata=flag("runs; the report gives each run's median"))
    output_json: str | None = field(default=None, metadata=flag("write the results here"))


@contextmanager
def stubbed_launches(counter: list[int]):
    """Triton launches are counted instead of run; products return an empty result."""
    import torch
    from triton.runtime.jit import JITFunction

    def launch(self, *args, grid, warmup, **kwargs):
        counter.append(1)

    def linear(x, weight, bias=None):
        return x.new_empty(x.shape[:-1] + (weight.shape[0],))

    with (mock.patch.object(JITFunction, "run", launch),
          mock.patch.object(torch.nn.functional, "linear", linear),
          mock.patch("pdserve.model.kernels.prefill_attention._device_smem_bytes", lambda index: 227 * 1024)):
        yield


def _model_and_batch(cfg: EagerLaunchConfig):
    import torch
    from pdserve.model.attention.triton_backend import TritonAttention
    from pdserve.model.config import ModelConfig
    from pdserve.model.forward_batch import ForwardBatch
    from pdserve.model.kernels.ops import TritonOps
    from pdserve.model.kernels.step_inputs import build_step
    from pdserve.model.models.llama import CausalLM

    page_size, heads, kv_heads, head_dim = 16, 4, 2, 16
    model_cfg = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": heads * head_dim, "intermediate_size": 128,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "num_hidden_layers": cfg.num_layers, "vocab_size": 256, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True})
    model = CausalLM(model_cfg, 4096)
    model.ops = TritonOps()
    attn = TritonAttention(heads, kv_heads, head_dim, page_size, torch.device("cpu"))
    pages = -(-cfg.tokens // page_size)
    kv = torch.zeros(cfg.num_layers, 2, pages, page_size, kv_heads, head_dim)
    step = build_step(False, [[1] * cfg.tokens], [0], [list(range(pages))], page_size)

    def forward():
        as_long = lambda a: torch.from_numpy(a.astype("int64"))  # noqa: E731
        batch = ForwardBatch(False, as_long(step.input_ids), as_long(step.positions), as_long(step.out_slots),
                             step.seq_lens.tolist(), [cfg.tokens], [list(range(pages))],
                             as_long(step.logits_indices))
        batch.attn = step
        attn.prepare(batch)
        with torch.inference_mode():
            return model(batch, attn, kv)

    return forward


def run(cfg: EagerLaunchConfig) -> dict:
    launches: list[int] = []
    with stubbed_launches(launches):
        forward = _model_and_batch(cfg)
        for _ in range(20):
            forward()
        launches.clear()
        forward()
        per_forward = len(launches)
        runs = []
        for _ in range(cfg.repeats):
            times = []
            for _ in range(cfg.forwards):
                began = time.perf_counter()
                forward()
                times.append(time.perf_counter() - began)
            runs.append(statistics.median(times) * 1e6)
    return {"config": asdict(cfg), "us_per_forward": [round(t, 1) for t in runs],
            "us_per_layer": [round(t / cfg.num_layers, 1) for t in runs],
            "triton_launches_per_forward": per_forward}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="eager_launch", description=__doc__.split("\n")[0])
    add_dataclass_args(ap, EagerLaunchConfig)
    cfg = config_from_args(EagerLaunchConfig, ap.parse_args(sys.argv[1:] if argv is None else argv))
    result = run(cfg)
    print(f"eager forward, {cfg.num_layers} layers, {cfg.tokens} tokens: host us per layer (each run's median) "
          f"{result['us_per_layer']}; Triton launches per forward {result['triton_launches_per_forward']}")
    if cfg.output_json:
        with open(cfg.output_json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
