"""Tensor parallelism: the rank group of one instance and how weights split over it.

Megatron's split: q/k/v and gate/up are column-parallel (each rank computes
its heads and its slice of the intermediate size), o_proj and down_proj are
row-parallel (each rank's partial sum is all-reduced), the embedding and the LM
head are split by vocabulary (embedding: all-reduce of masked lookups; LM
head: all-gather of each rank's logits). KV heads split like the q heads;
with more ranks than KV heads each rank holds one, replicated
(``kv_head_range``).

The group is torch.distributed (gloo on CPU, NCCL on CUDA) with a timeout on
every collective, so a rank that died ends its peers' step with an error
instead of a hang. A group of one rank makes every collective a no-op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
from pdserve.common.kv_layout import kv_head_range
from pdserve.model.config import ModelConfig

logger = logging.getLogger("pdserve.parallel")


class TPGroup:
    """This process's place among its instance's ranks, and their collectives."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None):
        self.rank = rank
        self.size = size
        self.device = device or torch.device("cpu")  # NCCL reduces device tensors only

    @classmethod
    def init(cls, rank: int, size: int, address: str, device: torch.device, timeout_s: float) -> TPGroup:
        if size == 1:
            return cls()
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s))
        logger.info("rank %d of %d joined the %s group at %s", rank, size, backend, address)
        return cls(rank, size, device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def all_reduce_min(self, value: int) -> int:
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


@dataclass(frozen=True)
class ShardPlan:
    """Which rows/columns of each full weight this rank keeps."""

    rank: int
    size: int
    num_heads: int  # q heads on this rank
    num_kv_heads: int  # KV heads on this rank
    kv_head_start: int
    intermediate_size: int
    vocab_shard: int  # rows of the embedding / LM head per rank (vocabulary padded up)
    head_dim: int

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int = 0, size: int = 1) -> ShardPlan:
        if cfg.num_heads % size or cfg.intermediate_size % size:
            raise ValueError(f"--tp-size {size} must divide the model's {cfg.num_heads} attention heads "
                             f"and intermediate size {cfg.intermediate_size}")
        kv_start, kv_count = kv_head_range(cfg.num_kv_heads, size, rank)
        return cls(rank, size, cfg.num_heads // size, kv_count, kv_start, cfg.intermediate_size // size,
                   -(-cfg.vocab_size // size), cfg.head_dim)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_shard

    def rows(self, hf_name: str) -> tuple[int, int] | None:
        """(start, length) of the output rows (dim 0) kept of a column-parallel weight."""
        d = self.head_dim
        if ".q_proj." in hf_name:
            return self.rank * self.num_heads * d, self.num_heads * d
        if ".k_proj." in hf_name or ".v_proj." in hf_name:
            return self.kv_head_start * d, self.num_kv_heads * d
        if ".gate_proj." in hf_name or ".up_proj." in hf_name:
            return self.rank * self.intermediate_size, self.intermediate_size
        if hf_name.endswith("embed_tokens.weight") or hf_name == "lm_head.weight":
            return self.vocab_start, self.vocab_shard
        return None

    def cols(self, hf_name: str) -> tuple[int, int] | None:
        """(start, length) of the input columns (last dim) kept of a row-parallel weight."""
        if ".o_proj." in hf_name:
            width = self.num_heads * self.head_dim
            return self.rank * width, width
        if ".down_proj." in hf_name:
            return self.rank * self.intermediate_size, self.intermediate_size
        return None

    def shard(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full checkpoint tensor (padded past the vocabulary)."""
        if self.size == 1:
            return tensor
        rows, cols = self.rows(hf_name), self.cols(hf_name)
        if rows is not None:
            start, length = rows
            part = tensor[start : start + length]
            if part.shape[0] < length:  # the last vocabulary shard: zero rows never win
                pad = torch.zeros((length - part.shape[0], *part.shape[1:]), dtype=part.dtype)
                part = torch.cat([part, pad])
            return part
        if cols is not None:
            start, length = cols
            return tensor[..., start : start + length]
        return tensor
