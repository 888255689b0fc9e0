"""Build a model and fill its weights: from safetensors files or random (dummy)."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import torch
from pdserve.model.config import ModelConfig
from pdserve.model.models.registry import model_class
from pdserve.model.parallel import ShardPlan, TPGroup

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(requested: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto`` takes the checkpoint's dtype; on CPU half types run as float32
    because CPU half matmuls are many times slower and no more exact."""
    if requested != "auto":
        return _DTYPES[requested]
    dtype = _DTYPES.get(cfg.torch_dtype.replace("torch.", ""), torch.float32)
    if device.type == "cpu" and dtype != torch.float32:
        return torch.float32
    return dtype


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}; use --load-format dummy for random weights")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights ``N(0, 1/fan_in)``, norms at 1. On CPU the values come from a
    CPU generator (reproducible everywhere); on GPU they are drawn on the device,
    which is many times faster for billion-parameter shapes."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
                continue
            fan_in = param.shape[-1]
            values = torch.randn(param.shape, generator=gen, device=device) * fan_in**-0.5
            param.copy_(values.to(param.dtype))


def load_model(
    cfg: ModelConfig, model_dir: str, load_format: str, dtype: torch.dtype, device: torch.device, max_positions: int, seed: int,
    tp: TPGroup | None = None,
) -> torch.nn.Module:
    """The model with this rank's shard of every weight (``tp``: the instance's
    ranks; each reads the full checkpoint tensors and keeps its part)."""
    tp = tp or TPGroup()
    cls = model_class(cfg.architecture)
    with torch.device("meta"):
        model = cls(cfg, max_positions, ShardPlan.of(cfg, tp.rank, tp.size)).to(dtype)
    # Materialise on the target device in the target dtype, then fill: never a
    # full-size CPU or float32 copy on GPU runs.
    model = model.to_empty(device=device)
    # The rotary tables are computed, not loaded, and stay float32.
    model.model.rotary = type(model.model.rotary)(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling).to(device)
    if load_format == "dummy":
        _init_dummy(model, seed + tp.rank)  # each rank its own random shard
    else:
        model.load_weights(iter_safetensors(model_dir))
    model.set_tp_group(tp)
    return model.eval()


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights under Hugging Face's names, fused projections split again
    (what ``save_file`` needs to let transformers load the same model)."""
    from pdserve.model.models.llama import _STACKED

    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        fused = next((f for f, _, _ in _STACKED if f".{f}." in name), None)
        if fused is None:
            out[name] = tensor.contiguous()
            continue
        module = model.get_submodule(name.rsplit(".", 1)[0].rsplit(".", 1)[0])
        start = 0
        for f, hf_name, shard in _STACKED:
            if f != fused:
                continue
            size = module.shard_sizes[shard]
            out[name.replace(f".{fused}.", f".{hf_name}.")] = tensor[start : start + size].contiguous()
            start += size
    return out
