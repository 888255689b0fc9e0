"""Loads the model, sizes the KV pool, and runs one forward step.

All device-specific choices (dtype, pool size, attention backend) are resolved
here once at start and logged in SGLang's words.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from pdserve.common.attention.base import create_attention_backend
from pdserve.common.config import ServerConfig
from pdserve.common.forward_batch import build_forward_batch
from pdserve.common.kv_layout import KVLayout
from pdserve.common.kv_pool import KVPool
from pdserve.common.model_config import ModelConfig
from pdserve.common.scheduler import ScheduledBatch
from pdserve.common.weights import load_model, resolve_dtype

logger = logging.getLogger("pdserve.model_runner")

CPU_KV_BUDGET_BYTES = 512 << 20  # default CPU pool: 512 MiB of KV
DEFAULT_MEM_FRACTION_STATIC = 0.85


def resolve_device(requested: str, base_gpu_id: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        torch.cuda.set_device(base_gpu_id)
        return torch.device("cuda", base_gpu_id)
    return torch.device("cpu")


@dataclass(frozen=True)
class RunnerInfo:
    max_total_num_tokens: int
    context_len: int
    dtype: str
    device: str
    available_gpu_mem_gb: float
    attention_backend: str


class ModelRunner:
    def __init__(self, cfg: ServerConfig, model_dir: str, model_cfg: ModelConfig):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = resolve_device(cfg.device, cfg.base_gpu_id)
        self.dtype = resolve_dtype(cfg.dtype, model_cfg, self.device)
        self.context_len = min(cfg.context_length or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
        if cfg.context_length and cfg.context_length > model_cfg.max_position_embeddings:
            logger.warning("context_length %d exceeds the model's %d; using the model's", cfg.context_length, self.context_len)
        torch.manual_seed(cfg.random_seed)
        self.model = load_model(model_cfg, model_dir, cfg.load_format, self.dtype, self.device, self.context_len + 1, cfg.random_seed)
        self.layout = self._size_pool()
        self.pool = KVPool(self.layout, self.dtype, self.device)
        self.attn_backend_name = cfg.attention_backend or ("flashinfer" if self.device.type == "cuda" else "torch")
        self.attn = create_attention_backend(
            self.attn_backend_name,
            num_heads=model_cfg.num_heads,
            num_kv_heads=model_cfg.num_kv_heads,
            head_dim=model_cfg.head_dim,
            page_size=cfg.page_size,
            device=self.device,
            dtype=self.dtype,
        )

    def _bytes_per_token(self) -> int:
        m = self.model_cfg
        return m.num_layers * 2 * m.num_kv_heads * m.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def _size_pool(self) -> KVLayout:
        tokens = self.cfg.max_total_tokens
        if tokens is None:
            tokens = self._auto_pool_tokens()
        num_pages = max(tokens // self.cfg.page_size, 1)
        m = self.model_cfg
        dtype_name = str(self.dtype).removeprefix("torch.")
        return KVLayout(m.num_layers, num_pages, self.cfg.page_size, m.num_kv_heads, m.head_dim, dtype_name)

    def _auto_pool_tokens(self) -> int:
        per_token = self._bytes_per_token()
        if self.device.type == "cpu":
            return max(min(CPU_KV_BUDGET_BYTES // per_token, 1 << 17), self.cfg.page_size)
        free, total = torch.cuda.mem_get_info(self.device)
        fraction = self.cfg.mem_fraction_static or DEFAULT_MEM_FRACTION_STATIC
        # SGLang's rule: the static part (weights + pool) may fill `fraction` of the
        # card; what the weights already took is gone from `free`.
        budget = free - total * (1 - fraction)
        if budget <= per_token * self.cfg.page_size:
            raise ValueError(f"--mem-fraction-static {fraction} leaves no memory for the KV pool")
        return int(budget // per_token)

    def available_gpu_mem_gb(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        return torch.cuda.mem_get_info(self.device)[0] / (1 << 30)

    def info(self) -> RunnerInfo:
        return RunnerInfo(
            max_total_num_tokens=self.layout.num_pages * self.layout.page_size,
            context_len=self.context_len,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            available_gpu_mem_gb=round(self.available_gpu_mem_gb(), 2),
            attention_backend=self.attn_backend_name,
        )

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """Float32 logits of each request's last fed token: [batch, vocab]."""
        fb = build_forward_batch(
            batch.is_decode, batch.chunks, batch.starts, [r.pages for r in batch.reqs], self.cfg.page_size, self.device
        )
        self.attn.prepare(fb)
        return self.model(fb, self.attn, self.pool.buffer)
