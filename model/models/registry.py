"""Model classes by Hugging Face architecture name."""

from __future__ import annotations

from pdserve.common.registry import Registry

_DENSE = "pdserve.model.models.llama:CausalLM"

MODELS: Registry[type] = Registry("architecture", {
    "LlamaForCausalLM": _DENSE,
    "MistralForCausalLM": _DENSE,
    "Qwen2ForCausalLM": _DENSE,
    "Qwen3ForCausalLM": _DENSE,
})


def model_class(architecture: str) -> type:
    return MODELS.get(architecture)
