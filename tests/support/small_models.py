"""Model shapes the GPU tests serve with dummy weights."""

from __future__ import annotations

import json
from pathlib import Path

# A small Llama with the benchmark models' head size (64), so flashinfer's kernels are shared.
SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 4096, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


def small_llama_dir(root: Path) -> str:
    """A model directory for :data:`SMALL_LLAMA` (config and the tiny tokenizer),
    its config file written under ``root``."""
    from pdserve.model.builtin import config_dir_for

    path = root / "small-llama.json"
    path.write_text(json.dumps(SMALL_LLAMA))
    return config_dir_for(path)
