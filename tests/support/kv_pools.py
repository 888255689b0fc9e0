"""A small paged KV pool on the CPU."""

from __future__ import annotations

import torch
from pdserve.common.kv_layout import KVLayout
from pdserve.model.kv_pool import KVPool


def make_pool(num_pages: int = 8, page_size: int = 4) -> KVPool:
    layout = KVLayout(num_layers=2, num_pages=num_pages, page_size=page_size, num_kv_heads=2, head_dim=8, dtype="float32")
    return KVPool(layout, torch.float32, torch.device("cpu"))
