"""Dummy weights with a planted previous-token head: confident, context-dependent
next-token distributions on which two bf16 implementations can be compared.

Plain random weights (``N(0, 1/fan_in)``) make a chaotic network: bf16 rounding
leaves a few percent of relative error in the last hidden state, and the first
token is the largest of ~10^5 nearly Gaussian logits whose lead over the
runner-up is often smaller than that. Transformers then disagrees with itself
(eager against SDPA, bf16 against float32) on several prompts in 64, so strict
first-token agreement measures rounding luck, not correctness.

A trained model does not behave like that: its predictions have margins far
above bf16 noise. ``plant_previous_token_head`` gives a random checkpoint that
property with the smallest circuit that still exercises the whole prefill path:

- Every embedding row gets a shared component ``c * u``. Layer 0's q and k
  projections read only ``u``, so every token's query and key are the same
  vectors, ``q`` and ``k = RoPE(q, +1)``. The attention score between positions
  ``m`` and ``n`` is then ``sum_p |q_p|^2 cos((n - m + 1) theta_p)``: it peaks at
  ``n = m - 1`` only because of the rotary embedding, and switching rotary off
  makes attention uniform.
- Layer 0's value projection copies the previous token's normalised embedding
  (one block of coordinates per KV head) and its output projection writes it
  back, ``beta`` times larger, so the residual stream carries the previous
  token. With tied embeddings the logit of that token stands out.
- Everything else stays random. The later layers add a random part to the
  logits (about two thirds of their spread on the Llama-3.2-1B shape), and the
  final norm gain sets the temperature: the chosen token's probability is a
  fraction (0.5-0.9), not 1, so the log-probability comparison is not trivially
  zero. The planted head decides the token, so one wrong later layer moves the
  chosen token's log-probability by only 0.005-0.04; plain random weights,
  where dropping one middle MLP changes 13-28 of 64 first tokens on these
  shapes, are the check for those.
"""

from __future__ import annotations

import math

import torch
from pdserve.model.config import ModelConfig
from pdserve.model.kernels.reference import apply_rotary
from pdserve.model.models.layers import RotaryEmbedding

# Defaults measured on the Llama-3.2-1B and Qwen3-0.6B shapes (float32 against
# bf16 in transformers): the previous token is chosen with a lead of 8+ nats over
# the runner-up, at probabilities of 0.5-0.9.
COPY_GAIN = 10.0
FINAL_NORM_GAIN = 0.7
# |q_p|^2 of each rotary pair used; with head_dim / 8 of the fastest pairs the
# previous position leads the next best one by ~8 in attention logits.
PAIR_ENERGY = 80.0


def previous_token_query_key(cfg: ModelConfig, pair_energy: float = PAIR_ENERGY) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) of one head, float32 ``[head_dim]``, with ``RoPE(q, m) . RoPE(k, n)``
    largest at ``n = m - 1``: the fastest ``head_dim / 8`` rotary pairs, random phases."""
    dim, half, pairs = cfg.head_dim, cfg.head_dim // 2, cfg.head_dim // 8
    rotary = RotaryEmbedding(dim, 2, cfg.rope_theta, cfg.rope_scaling)
    phase = torch.rand(pairs, generator=torch.Generator().manual_seed(0)) * 2 * math.pi
    q = torch.zeros(dim)
    q[:pairs] = math.sqrt(pair_energy) * phase.cos()
    q[half : half + pairs] = math.sqrt(pair_energy) * phase.sin()
    k = apply_rotary(q.view(1, 1, dim), rotary.cos_cache[1:2], rotary.sin_cache[1:2]).view(dim)
    return q, k


def _copy_coordinate(cfg: ModelConfig, kv_head: int, i: int) -> int:
    """Residual coordinate carried by element ``i`` of KV head ``kv_head``'s value."""
    return (kv_head * cfg.head_dim + i) % cfg.hidden_size


def plant_previous_token_head(
    weights: dict[str, torch.Tensor],
    cfg: ModelConfig,
    copy_gain: float = COPY_GAIN,
    final_norm_gain: float = FINAL_NORM_GAIN,
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """A copy of Hugging Face-named ``weights`` (random, norms at 1) with layer 0's
    attention replaced by the previous-token head described in the module doc."""
    if not cfg.tie_word_embeddings:
        raise ValueError("the planted head reads the copied token through tied embeddings")
    if cfg.attention_bias:
        raise ValueError("q/k/v biases would break the constant queries")
    out = dict(weights)
    d, heads, kv_heads, dim = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    embed = weights["model.embed_tokens.weight"].float()
    device = embed.device
    copied = min(kv_heads * dim, d)
    # u lives outside the copied coordinates where there are any, so the copy
    # carries token identity only.
    u = torch.zeros(d, device=device)
    lo = copied if copied < d else 0
    u[lo:] = torch.randn(d - lo, generator=torch.Generator().manual_seed(seed)).to(device)
    u /= u.norm()
    embed = embed + embed.norm(dim=-1).mean() * u
    # u . rmsnorm(e_i): nearly the same for every token (row norms vary ~1.5%).
    reach = float(((embed @ u) * math.sqrt(d) / embed.norm(dim=-1)).mean())
    q, k = (x.to(device) for x in previous_token_query_key(cfg))
    value = torch.zeros(kv_heads * dim, d, device=device)
    o_proj = torch.zeros(d, heads * dim, device=device)
    group = heads // kv_heads
    for h in range(kv_heads):
        for i in range(dim):
            value[h * dim + i, _copy_coordinate(cfg, h, i)] = 1.0
    for j in range(heads):
        for i in range(dim):
            o_proj[_copy_coordinate(cfg, j // group, i), j * dim + i] = copy_gain / group
    layer = "model.layers.0.self_attn."
    planted = {
        "model.embed_tokens.weight": embed,
        layer + "q_proj.weight": torch.outer(q.repeat(heads), u) / reach,
        layer + "k_proj.weight": torch.outer(k.repeat(kv_heads), u) / reach,
        layer + "v_proj.weight": value,
        layer + "o_proj.weight": o_proj,
        "model.norm.weight": torch.full((d,), final_norm_gain, device=device),
    }
    if cfg.qk_norm:
        # The per-head norm rescales the (already constant) query to unit RMS; its
        # gain restores q's and k's length.
        planted[layer + "q_norm.weight"] = torch.full((dim,), float(q.pow(2).mean().sqrt()), device=device)
        planted[layer + "k_norm.weight"] = torch.full((dim,), float(k.pow(2).mean().sqrt()), device=device)
    for name, tensor in planted.items():
        out[name] = tensor.to(weights[name].dtype).contiguous()
    if "lm_head.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def write_dummy_checkpoint(
    config_dir: str, out_dir: str, device: torch.device, dtype: torch.dtype, planted: bool = True, seed: int = 7
) -> ModelConfig:
    """A Hugging Face directory in ``out_dir``: ``config_dir``'s config and
    tokenizer, and pdserve's dummy weights (``seed``), with the planted head
    unless ``planted`` is False."""
    import shutil
    from pathlib import Path

    from pdserve.model.weights import hf_state_dict, load_model
    from safetensors.torch import save_file

    cfg = ModelConfig.from_dir(config_dir)
    model = load_model(cfg, config_dir, "dummy", dtype, device, max_positions=8, seed=seed)
    weights = hf_state_dict(model)
    if planted:
        weights = plant_previous_token_head(weights, cfg)
    del model
    save_file(weights, str(Path(out_dir) / "model.safetensors"))
    for path in Path(config_dir).iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copyfile(path, Path(out_dir) / path.name)
    return cfg
