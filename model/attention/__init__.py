"""Attention backends by name (``base.ATTENTION_BACKENDS``): ``torch`` (the reference, on CPU),
``flashinfer``, ``flashinfer_decode`` and ``triton`` (GPU, loaded only when chosen)."""
