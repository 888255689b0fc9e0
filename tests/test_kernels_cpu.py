"""CPU-side checks of the GPU fast path: graph batch sizes, host step inputs,
next-step prediction, the weight export, and the model against transformers."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from pdserve.common.config import ServerConfig
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.request import Req
from pdserve.model import builtin as bm
from pdserve.model.batch import ScheduledBatch
from pdserve.model.config import ModelConfig
from pdserve.model.cuda_graph import capture_batch_sizes, padded_batch_size
from pdserve.model.forward_batch import build_forward_batch
from pdserve.model.kernels import reference
from pdserve.model.kernels.step_inputs import build_step
from pdserve.model.runner import ModelRunner
from pdserve.model.weights import hf_state_dict

PAGE = 4


# ---- CUDA graph batch sizes ------------------------------------------------------
def test_default_ladder_is_sglangs() -> None:
    sizes = capture_batch_sizes(None, None)
    assert sizes[:8] == [1, 2, 4, 8, 16, 24, 32, 40]
    assert sizes[-3:] == [224, 240, 256]
    assert capture_batch_sizes(100, None)[-3:] == [80, 96, 100]


def test_explicit_sizes_are_sorted_and_clipped() -> None:
    assert capture_batch_sizes(16, (8, 1, 32, 8, 3)) == [1, 3, 8]
    with pytest.raises(ValueError):
        capture_batch_sizes(4, (8, 16))


@pytest.mark.parametrize(
    "bs, padding, expected",
    [(1, True, 1), (3, True, 4), (3, False, None), (8, False, 8), (9, True, 16), (17, True, None)],
)
def test_padded_batch_size(bs: int, padding: bool, expected: int | None) -> None:
    assert padded_batch_size(bs, [1, 2, 4, 8, 16], padding) == expected


# ---- host step inputs ------------------------------------------------------------
def _random_batch(rng: random.Random, is_decode: bool, num_seqs: int):
    free = list(range(500))
    rng.shuffle(free)
    chunks, starts, tables = [], [], []
    for _ in range(num_seqs):
        start = rng.randrange(0, 40)
        n = 1 if is_decode else rng.randrange(1, 30)
        pages = [free.pop() for _ in range(-(-(start + n) // PAGE) + rng.randrange(0, 2))]
        chunks.append([rng.randrange(1000) for _ in range(n)])
        starts.append(start)
        tables.append(pages)
    return chunks, starts, tables


@pytest.mark.parametrize("is_decode", [False, True])
def test_build_step_matches_forward_batch(is_decode: bool) -> None:
    rng = random.Random(1)
    for _ in range(20):
        chunks, starts, tables = _random_batch(rng, is_decode, rng.randrange(1, 6))
        fb = build_forward_batch(is_decode, chunks, starts, tables, PAGE, torch.device("cpu"))
        step = build_step(is_decode, chunks, starts, tables, PAGE)
        for name in ("input_ids", "positions", "out_slots", "logits_indices"):
            assert getattr(step, name).tolist() == getattr(fb, name).tolist(), name
        assert step.seq_lens.tolist() == fb.seq_lens
        for i, (table, seq_len) in enumerate(zip(tables, fb.seq_lens)):
            pages = step.kv_indices[step.kv_indptr[i] : step.kv_indptr[i + 1]].tolist()
            assert pages == table[: -(-seq_len // PAGE)]
            assert step.kv_last_page_len[i] == seq_len - (len(pages) - 1) * PAGE


def test_padded_step_adds_unstored_one_token_rows() -> None:
    step = build_step(True, [[5], [6]], [3, 9], [[7], [1, 2, 8]], PAGE).padded(4)
    assert step.batch_size == 4
    assert step.out_slots.tolist() == [7 * PAGE + 3, 8 * PAGE + 1, -1, -1]
    assert step.kv_indptr.tolist() == [0, 1, 4, 5, 6]
    assert step.kv_indices[-2:].tolist() == [0, 0] and step.seq_lens[-2:].tolist() == [1, 1]


class _Seq:
    def __init__(self, pages: list[int], seq_len: int):
        self.pages, self.seq_len = pages, seq_len


def _decode_batch(seqs: list[_Seq]):
    return [[s.seq_len] for s in seqs], [s.seq_len - 1 for s in seqs], [s.pages for s in seqs]


def _assert_same(a, b) -> None:
    for name in ("input_ids", "positions", "out_slots", "kv_indptr", "kv_indices", "kv_last_page_len", "seq_lens"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name


def test_reference_rope_store_skips_negative_slots() -> None:
    heads, kv_heads, dim = 4, 2, 8
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(10, dim // 2), torch.randn(10, dim // 2)
    k_cache = torch.zeros(2, PAGE, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    q = reference.rope_store(qkv, torch.tensor([0, 5, 9]), cos, sin, heads, kv_heads, k_cache, v_cache,
                             torch.tensor([1, -1, 6]))
    assert q.shape == (3, heads, dim)
    flat_v = v_cache.view(-1, kv_heads * dim)
    assert torch.equal(flat_v[1], qkv[0, -kv_heads * dim :]) and torch.equal(flat_v[6], qkv[2, -kv_heads * dim :])
    assert int((flat_v.abs().sum(-1) > 0).sum()) == 2


# ---- the model against transformers ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bm.MODEL_DIR_ENV, str(tmp_path_factory.mktemp("models")))
        yield bm.ensure_builtin_model("tiny")


def _greedy(runner: ModelRunner, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """Chunked prefill of the second prompt, then batched greedy decode."""
    reqs = [Req(str(i), list(p), SamplingParams(max_new_tokens=num_new, temperature=0)) for i, p in enumerate(prompts)]
    for r in reqs:
        r.pages = runner.pool.alloc(-(-(len(r.prompt_ids) + num_new) // runner.cfg.page_size))
    runner.forward(ScheduledBatch(False, [reqs[1]], [prompts[1][:5]], [0]))
    logits = runner.forward(ScheduledBatch(False, reqs, [prompts[0], prompts[1][5:]], [0, 5]))
    for _ in range(num_new):
        for r, row in zip(reqs, logits):
            r.output_ids.append(int(row.argmax()))
        batch = ScheduledBatch(True, reqs, [[r.output_ids[-1]] for r in reqs], [r.seq_len - 1 for r in reqs])
        logits = runner.forward(batch)
    return [r.output_ids for r in reqs]


def test_cpu_runner_matches_transformers(tiny_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    runner = ModelRunner(ServerConfig(model_path=tiny_dir, page_size=PAGE), tiny_dir, ModelConfig.from_dir(tiny_dir))
    prompts = [[5, 17, 99, 3, 44, 81, 12], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 2]]
    ours = _greedy(runner, prompts, 6)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    for out, prompt in zip(ours, prompts):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
        assert out == ref.tolist()


def test_dummy_weights_export_loads_into_transformers(tiny_dir: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = ServerConfig(model_path=tiny_dir, page_size=PAGE, load_format="dummy", random_seed=3)
    runner = ModelRunner(cfg, tiny_dir, ModelConfig.from_dir(tiny_dir))
    save_file(hf_state_dict(runner.model), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(Path(tiny_dir, "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    req = Req("a", prompt, SamplingParams())
    req.pages = runner.pool.alloc(2)
    ours = runner.forward(ScheduledBatch(False, [req], [prompt], [0]))[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0, -1]
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-4)


def test_gate_up_config_takes_the_nearest_tuned_batch_at_or_above() -> None:
    from pdserve.model.kernels.tilings import GATE_UP_TUNED, gate_up_candidates, gate_up_config

    llama_1b, llama_8b = (8192, 2048), (14336, 4096)
    assert gate_up_config(128, *llama_1b) == GATE_UP_TUNED[(128, *llama_1b)]
    assert gate_up_config(100, *llama_1b) == GATE_UP_TUNED[(128, *llama_1b)]
    assert gate_up_config(33, *llama_1b) == GATE_UP_TUNED[(64, *llama_1b)]
    assert gate_up_config(65, *llama_8b) == GATE_UP_TUNED[(128, *llama_8b)]
    # small batches, batches past the table, untuned sizes and shapes: cuBLAS
    assert gate_up_config(32, *llama_1b) is None and gate_up_config(129, *llama_1b) is None
    assert gate_up_config(200, *llama_8b) is None and gate_up_config(128, 4096, 2048) is None
    # what the table uses, the sweep times; K divides into its tiles
    for (_, _, k), config in GATE_UP_TUNED.items():
        assert config in gate_up_candidates() and k % config.block_k == 0
