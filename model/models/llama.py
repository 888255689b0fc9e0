"""Dense decoder family: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Parameter names follow Hugging Face's, except q/k/v and gate/up, which are fused
into ``qkv_proj`` and ``gate_up_proj`` at load time (one matmul instead of three).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from pdserve.model.attention.base import AttentionBackend
from pdserve.model.config import ModelConfig
from pdserve.model.forward_batch import ForwardBatch
from pdserve.model.kernels.ops import TorchOps
from pdserve.model.models.layers import RMSNorm, RotaryEmbedding
from pdserve.model.parallel import ShardPlan, TPGroup
from torch import nn

# (fused parameter, HF parameter, shard index)
_STACKED = (
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


class FusedProjections(nn.Module):
    """A module with one projection fused from several of Hugging Face's:
    ``shard_sizes`` are the parts' output sizes, in ``_STACKED``'s shard order."""

    shard_sizes: tuple[int, ...] = ()


class Attention(FusedProjections):
    """This rank's heads (all of them at TP 1); o_proj's output is a partial sum under TP."""

    def __init__(self, cfg: ModelConfig, layer_id: int, plan: ShardPlan):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = plan.num_heads, plan.num_kv_heads, cfg.head_dim
        self.q_size = plan.num_heads * cfg.head_dim
        self.kv_size = plan.num_kv_heads * cfg.head_dim
        self.shard_sizes = (self.q_size, self.kv_size, self.kv_size)
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def attend(self, qkv: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding, attn: AttentionBackend,
               kv_cache: torch.Tensor, ops) -> torch.Tensor:
        """Attention output ``[T, H * D]`` (before o_proj) of a fused qkv projection."""
        k_cache, v_cache = kv_cache[self.layer_id].unbind(0)
        if ops.fuses_rope_store and attn.accepts_stored_kv:
            # Rotary, q/k norm and the K/V page store in one kernel; the backend only attends.
            q = ops.rope_store(
                qkv, batch.positions, rotary.cos_cache, rotary.sin_cache, self.num_heads, self.num_kv_heads,
                k_cache, v_cache, batch.out_slots,
                None if self.q_norm is None else self.q_norm.weight,
                None if self.k_norm is None else self.k_norm.weight,
                self.q_norm.eps if self.q_norm is not None else 1e-6,
            )
            out = attn.forward(batch, q, None, None, k_cache, v_cache)
        else:
            q, k, v = qkv.split(self.shard_sizes, dim=-1)
            q = q.reshape(-1, self.num_heads, self.head_dim)
            k = k.reshape(-1, self.num_kv_heads, self.head_dim)
            v = v.reshape(-1, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotary(batch.positions, q, k)
            out = attn.forward(batch, q, k, v, k_cache, v_cache)
        return out.reshape(-1, self.q_size)


class MLP(FusedProjections):
    def __init__(self, cfg: ModelConfig, plan: ShardPlan):
        super().__init__()
        inter = plan.intermediate_size
        self.shard_sizes = (inter, inter)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, plan: ShardPlan):
        super().__init__()
        self.self_attn = Attention(cfg, layer_id, plan)
        self.mlp = MLP(cfg, plan)
        self.tp = TPGroup()  # the load sets the instance's group
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden, residual, batch, rotary, attn, kv_cache, ops, keep_rows=None):
        """Many tokens: matmuls, with each residual add fused into the next norm.

        ``hidden`` is the previous sub-layer's output and ``residual`` the sum so
        far (None before the first layer); returns the same pair. With
        ``keep_rows``, every token still stores its K/V, but only those rows go
        on past attention (the last layer: only the rows that get logits)."""
        norm_in, norm_post, a = self.input_layernorm, self.post_attention_layernorm, self.self_attn
        if residual is None:
            residual, h = hidden, ops.rmsnorm(hidden, norm_in.weight, norm_in.eps)
        else:
            h, residual = ops.add_rmsnorm(hidden, residual, norm_in.weight, norm_in.eps)
        out = a.attend(a.qkv_proj(h), batch, rotary, attn, kv_cache, ops)
        if keep_rows is not None:
            out, residual = out[keep_rows], residual[keep_rows]
        hidden = self.tp.all_reduce(a.o_proj(out))
        h, residual = ops.add_rmsnorm(hidden, residual, norm_post.weight, norm_post.eps)
        act = ops.gate_up_silu(h, self.mlp.gate_up_proj.weight)
        return self.tp.all_reduce(self.mlp.down_proj(act)), residual

    def forward_one(self, x, batch, rotary, attn, kv_cache, ops):
        """One token: four matrix-vector kernels, norms and residual adds fused in.

        ``x`` is the residual stream ``[1, hidden]``; returns it updated."""
        norm_in, norm_post, a = self.input_layernorm, self.post_attention_layernorm, self.self_attn
        qkv = ops.gemv(x, a.qkv_proj.weight, norm_weight=norm_in.weight, eps=norm_in.eps, bias=a.qkv_proj.bias)
        x = ops.gemv(a.attend(qkv, batch, rotary, attn, kv_cache, ops), a.o_proj.weight, residual=x)
        act = ops.gemv(x, self.mlp.gate_up_proj.weight, norm_weight=norm_post.weight, eps=norm_post.eps, gated=True)
        return ops.gemv(act, self.mlp.down_proj.weight, residual=x)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, plan: ShardPlan):
        super().__init__()
        self.embed_tokens = nn.Embedding(plan.vocab_shard, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, plan) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, plan: ShardPlan | None = None):
        super().__init__()
        self.config = cfg
        self.plan = plan or ShardPlan.of(cfg)
        self.tp = TPGroup()
        self.model = DecoderModel(cfg, max_positions, self.plan)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, self.plan.vocab_shard, bias=False)
        # The fused-operation implementations; the runner swaps in the Triton kernels on GPU.
        self.ops = TorchOps()

    @property
    def lm_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, batch: ForwardBatch, attn: AttentionBackend, kv_cache: torch.Tensor) -> torch.Tensor:
        """Logits of each sequence's last new token: [batch, vocab], in the
        weights' dtype (the sampler widens them where it computes more than an
        argmax: a float32 copy of a bf16 batch would cost as much memory
        traffic as the head's own output, twice), or float32 from the batch-1
        product, which writes float32 at no cost."""
        ops, m = self.ops, self.model
        x = m.embed_tokens(batch.input_ids) if self.tp.size == 1 else self._embed_parallel(batch.input_ids)
        if ops.has_gemv and batch.num_tokens == 1 and self.tp.size == 1:
            for layer in m.layers:
                x = layer.forward_one(x, batch, m.rotary, attn, kv_cache, ops)
            return ops.gemv(x, self.lm_weight, norm_weight=m.norm.weight, eps=m.norm.eps, out_float=True)
        # Only the rows that get logits need the last layer past its attention:
        # for a prompt, that skips the last layer's o_proj and MLP for all but
        # one token per sequence (1/num_layers of a long prefill's matmuls).
        idx = batch.logits_indices
        keep = idx if idx.shape[0] < x.shape[0] else None
        residual, last = None, len(m.layers) - 1
        for i, layer in enumerate(m.layers):  # (slicing a ModuleList builds a new one each forward)
            x, residual = layer(x, residual, batch, m.rotary, attn, kv_cache, ops, keep if i == last else None)
        if keep is None:
            x, residual = x[idx], residual[idx]
        x, _ = ops.add_rmsnorm(x, residual, m.norm.weight, m.norm.eps)
        logits = F.linear(x, self.lm_weight)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather_last(logits)[:, : self.config.vocab_size]

    def set_tp_group(self, tp: TPGroup) -> None:
        self.tp = tp
        for layer in self.model.layers:
            layer.tp = tp

    def _embed_parallel(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel lookup: each rank fills the rows of its ids, zeros elsewhere; summed."""
        local = ids - self.plan.vocab_start
        outside = (local < 0) | (local >= self.plan.vocab_shard)
        x = self.model.embed_tokens(local.masked_fill(outside, 0))
        return self.tp.all_reduce(x.masked_fill(outside[:, None], 0))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, shard = _fused_target(name)
            if target not in params:
                raise ValueError(f"unexpected weight {name}")
            sizes = () if shard is None else self._shard_sizes(target)
            _copy_into(params[target], self.plan.shard(name, tensor), shard, sizes)
            loaded.add(target if shard is None else f"{target}#{shard}")
        missing = self._expected_names() - loaded
        if missing:
            raise ValueError(f"weights missing from checkpoint: {sorted(missing)[:5]}")

    def _shard_sizes(self, target: str) -> tuple[int, ...]:
        """The part sizes of the fused projection whose parameter ``target`` names."""
        module = self.get_submodule(target.rsplit(".", 2)[0])
        if not isinstance(module, FusedProjections):
            raise TypeError(f"{target} is not a fused projection's parameter")
        return module.shard_sizes

    def _expected_names(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            fused = next((f for f, _, _ in _STACKED if f".{f}." in name), None)
            if fused is None:
                names.add(name)
                continue
            shards = 3 if fused == "qkv_proj" else 2
            if name.endswith("bias") or name.endswith("weight"):
                names.update(f"{name}#{i}" for i in range(shards))
        return names


def _fused_target(name: str) -> tuple[str, int | None]:
    for fused, hf_name, shard in _STACKED:
        if f".{hf_name}." in name:
            return name.replace(f".{hf_name}.", f".{fused}."), shard
    return name, None


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, shard: int | None, sizes: tuple[int, ...]) -> None:
    with torch.no_grad():
        if shard is None:
            if param.shape != tensor.shape:
                raise ValueError(f"shape mismatch: {tuple(param.shape)} vs {tuple(tensor.shape)}")
            param.copy_(tensor)
            return
        start = sum(sizes[:shard])
        param[start : start + sizes[shard]].copy_(tensor)
