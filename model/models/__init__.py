"""Model implementations by Hugging Face architecture (``registry.MODELS``): the dense
Llama family (Llama, Mistral, Qwen2, Qwen3) in ``llama.py``, with its layers in ``layers.py``."""
