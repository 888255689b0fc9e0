"""The planted previous-token head (tests/support/planted_model.py) on small Llama and
Qwen3 shapes in float32 on the CPU: transformers predicts the previous prompt
token with a wide margin and a probability short of 1, only because of the
rotary embedding, and pdserve's prefill agrees with transformers on it."""

from __future__ import annotations

import json

import pytest
import torch
from pdserve.tests.support.planted_model import previous_token_query_key, write_dummy_checkpoint

SHAPES = {
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True, "torch_dtype": "float32",
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 1000, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 4096, "tie_word_embeddings": True, "torch_dtype": "float32",
    },
}


def _prompts(vocab: int, count: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(99)
    lengths = torch.randint(3, 120, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def planted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from pdserve.model.builtin import config_dir_for

    root = tmp_path_factory.mktemp(request.param)
    (root / "config.json").write_text(json.dumps(SHAPES[request.param]))
    out = root / "model"
    out.mkdir()
    cfg = write_dummy_checkpoint(config_dir_for(root / "config.json"), str(out), torch.device("cpu"), torch.float32)
    return cfg, str(out)


def _hf_logits(model_dir: str, prompts: list[list[int]], rotary: bool = True) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if not rotary:
        # positions no longer reach attention: every position rotates by zero
        hf.model.rotary_emb.inv_freq.zero_()
    with torch.no_grad():
        return [hf(torch.tensor([p]), logits_to_keep=1).logits[0, -1] for p in prompts]


def test_query_and_key_attend_to_the_previous_position(planted) -> None:
    from pdserve.model.kernels.reference import apply_rotary
    from pdserve.model.models.layers import RotaryEmbedding

    cfg, _ = planted
    q, k = previous_token_query_key(cfg)
    rotary = RotaryEmbedding(cfg.head_dim, 512, cfg.rope_theta, cfg.rope_scaling)
    positions = torch.arange(400)
    keys = apply_rotary(k.expand(400, 1, -1), rotary.cos_cache[positions], rotary.sin_cache[positions])[:, 0]
    query = apply_rotary(q.view(1, 1, -1), rotary.cos_cache[399:400], rotary.sin_cache[399:400]).view(-1)
    scores = keys @ query / cfg.head_dim**0.5
    best, runner_up = scores.topk(2).indices.tolist()
    assert best == 398
    assert float(scores[best] - scores[runner_up]) > 4.0


def test_transformers_predicts_the_previous_token_through_rotary(planted) -> None:
    cfg, model_dir = planted
    prompts = _prompts(cfg.vocab_size)
    logits = _hf_logits(model_dir, prompts)
    chosen = [int(z.argmax()) for z in logits]
    assert chosen == [p[-2] for p in prompts]
    top2 = [z.topk(2).values for z in logits]
    assert min(float(a - b) for a, b in top2) > 2.0  # nats: far above bf16 rounding
    probs = [float(torch.softmax(z, -1).max()) for z in logits]
    assert 0.2 < min(probs) and max(probs) < 0.95  # log-probabilities are not trivially zero
    without_rotary = [int(z.argmax()) for z in _hf_logits(model_dir, prompts, rotary=False)]
    assert sum(c == p[-2] for c, p in zip(without_rotary, prompts)) <= len(prompts) // 4


def _prefill(cfg, model_dir: str, prompts: list[list[int]]) -> tuple[torch.Tensor, dict[str, int]]:
    """Logits of one batched prefill of ``prompts``, and how many rows reached
    the first and the last layer's MLP."""
    from pdserve.common.config import ServerConfig
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.engine.request import Req
    from pdserve.model.batch import ScheduledBatch
    from pdserve.model.runner import ModelRunner

    runner = ModelRunner(ServerConfig(model_path=model_dir, dtype="float32", max_total_tokens=4096), model_dir, cfg)
    reqs = [Req(str(i), p, SamplingParams(temperature=0)) for i, p in enumerate(prompts)]
    for req in reqs:
        req.pages = runner.pool.alloc(-(-(len(req.prompt_ids) + 1) // runner.cfg.page_size))
    layers = runner.model.model.layers
    mlp_rows: dict[str, int] = {}
    for name, layer in (("first", layers[0]), ("last", layers[-1])):
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, name=name: mlp_rows.__setitem__(name, args[0].shape[0]))
    logits = runner.forward(ScheduledBatch(False, reqs, [r.prompt_ids for r in reqs], [0] * len(reqs)))
    return logits, mlp_rows


def test_pdserve_prefill_agrees_with_transformers(planted) -> None:
    cfg, model_dir = planted
    prompts = _prompts(cfg.vocab_size)
    ours, mlp_rows = _prefill(cfg, model_dir, prompts)
    theirs = torch.stack(_hf_logits(model_dir, prompts))
    # Past its attention, the last layer ran only the rows that get logits.
    assert mlp_rows == {"first": sum(map(len, prompts)), "last": len(prompts)}
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()
    assert torch.allclose(torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1), atol=1e-3)
