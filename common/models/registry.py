"""Model classes by Hugging Face architecture name."""

from __future__ import annotations

from collections.abc import Callable

_MODELS: dict[str, type] = {}


def register_model(*architectures: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        for arch in architectures:
            _MODELS[arch] = cls
        return cls

    return wrap


def model_class(architecture: str) -> type:
    from pdserve.common.models import llama  # noqa: F401  (registers the dense family)

    if architecture not in _MODELS:
        raise ValueError(f"unsupported architecture {architecture}; known: {sorted(_MODELS)}")
    return _MODELS[architecture]
