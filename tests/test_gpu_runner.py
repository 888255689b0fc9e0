"""The model runner on the GPU: CUDA graphs (padding, flags), backends, and
pool sizing from free memory (the overlap schedule: test_overlap_schedule.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pdserve.common.config import ServerConfig
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.request import Req
from pdserve.model.batch import ScheduledBatch
from pdserve.model.config import ModelConfig
from pdserve.model.runner import ModelRunner
from pdserve.tests.support.small_models import small_llama_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return small_llama_dir(tmp_path_factory.mktemp("cfg"))


def _runner(model_dir: str, **flags) -> ModelRunner:
    base = dict(model_path=model_dir, load_format="dummy", dtype="bfloat16", max_total_tokens=8192,
                cuda_graph_bs=(1, 2, 4, 8), prefill_cuda_graph_max_tokens=1024, prefill_cuda_graph_max_seqs=4)
    cfg = ServerConfig(**{**base, **flags})
    return ModelRunner(cfg, model_dir, ModelConfig.from_dir(model_dir))


def _requests(runner: ModelRunner, lengths: list[int], steps: int) -> list[Req]:
    g = torch.Generator().manual_seed(sum(lengths))
    reqs = []
    for i, n in enumerate(lengths):
        req = Req(str(i), torch.randint(0, 1000, (n,), generator=g).tolist(), SamplingParams(temperature=0))
        req.pages = runner.pool.alloc(-(-(n + steps + 1) // runner.cfg.page_size))
        reqs.append(req)
    return reqs


def _teacher_forced(runners: list[ModelRunner], lengths: list[int], steps: int, subsets: list[list[int]]):
    """Prefill, then decode steps over ``subsets`` of the requests with the
    first runner's greedy tokens fed to all; per step, every runner's logits
    and whether it replayed a graph."""
    per_runner = [_requests(r, lengths, steps) for r in runners]
    history = []
    prefill = [r.forward(ScheduledBatch(False, q, [x.prompt_ids for x in q], [0] * len(q)))
               for r, q in zip(runners, per_runner)]
    tokens = prefill[0].argmax(-1).tolist()
    for reqs in per_runner:
        for req, t in zip(reqs, tokens):
            req.output_ids.append(t)
    for step in range(steps):
        rows = subsets[step % len(subsets)]
        outs = []
        for runner, reqs in zip(runners, per_runner):
            live = [reqs[i] for i in rows]
            batch = ScheduledBatch(True, live, [[q.output_ids[-1]] for q in live], [q.seq_len - 1 for q in live])
            outs.append((runner.forward(batch).clone(), runner.uses_cuda_graph))
        history.append(outs)
        for i, t in zip(rows, outs[0][0].argmax(-1).tolist()):
            for reqs in per_runner:
                reqs[i].output_ids.append(t)
    return history


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-2) -> bool:
    return float((a - b).norm() / b.norm()) < tol


def test_graph_replay_matches_eager_and_pads(model_dir: str) -> None:
    graphs, eager = _runner(model_dir), _runner(model_dir, disable_cuda_graph=True)
    assert graphs.graphs is not None and eager.graphs is None
    subsets = [[0, 1, 2, 3, 4], [1], [0, 2, 4], list(range(9))]  # 5 and 3 pad to 8 and 4; 9 runs eagerly
    history = _teacher_forced([graphs, eager], [5, 17, 40, 16, 33, 8, 1, 64, 20], 8, subsets)
    for step, ((g_logits, g_used), (e_logits, e_used)) in enumerate(history):
        assert g_used == (len(subsets[step % 4]) <= 8) and not e_used
        assert g_logits.shape == e_logits.shape and _close(g_logits, e_logits), step


class _Prefix:
    """The first ``length`` prompt tokens of ``req``, on its pages."""

    def __init__(self, req: Req, length: int):
        self.prompt_ids, self.pages = req.prompt_ids[:length], req.pages


def _prefill(runner: ModelRunner, reqs: list[Req], starts: list[int]) -> torch.Tensor:
    chunks = [r.prompt_ids[s:] for r, s in zip(reqs, starts)]
    return runner.forward(ScheduledBatch(False, reqs, chunks, starts)).clone()


def _kv_of(runner: ModelRunner, reqs: list[Req]) -> torch.Tensor:
    torch.cuda.synchronize()
    pages = torch.tensor(sorted({p for r in reqs for p in r.pages}), device="cuda")
    return runner.pool.buffer[:, :, pages].float()


def test_prefill_graphs_match_eager(model_dir: str) -> None:
    """Single prompts, batches, a chunk over a cached prefix and a one-token
    prompt replay a prefill graph and give eager's logits and stored KV; a
    batch of more sequences than a graph takes, or more tokens, runs eagerly."""
    graphs, eager = _runner(model_dir), _runner(model_dir, disable_prefill_cuda_graph=True)
    assert graphs.prefill_graphs is not None and eager.prefill_graphs is None
    cases = [([500], [0], True), ([5, 17, 300], [0, 0, 0], True), ([700, 40], [512, 32], True), ([1], [0], True),
             ([9] * 5, [0] * 5, False), ([1100], [0], False)]
    for lengths, starts, replayed in cases:
        outs, kvs = [], []
        for runner in (graphs, eager):
            reqs = _requests(runner, lengths, 0)
            if any(starts):  # the cached prefixes first
                _prefill(runner, [_Prefix(r, s) for r, s in zip(reqs, starts)], [0] * len(reqs))
            outs.append((_prefill(runner, reqs, starts), runner.uses_cuda_graph))
            kvs.append(_kv_of(runner, reqs))
            runner.pool.release([p for r in reqs for p in r.pages])
        (g_logits, g_used), (e_logits, e_used) = outs
        assert g_used == replayed and not e_used, lengths
        assert g_logits.shape == e_logits.shape == (len(lengths), graphs.model_cfg.vocab_size)
        assert _close(g_logits, e_logits), lengths
        assert _close(kvs[0], kvs[1]), lengths


def test_without_padding_only_captured_sizes_replay(model_dir: str) -> None:
    runner = _runner(model_dir, cuda_graph_bs=(1, 4), disable_cuda_graph_padding=True)
    history = _teacher_forced([runner], [9, 9, 9, 9], 4, [[0, 1, 2], [0, 1, 2, 3], [3], [0, 1]])
    assert [h[0][1] for h in history] == [False, True, True, False]


def test_backends_agree(model_dir: str) -> None:
    pytest.importorskip("flashinfer")
    names = ["flashinfer", "triton", "flashinfer_decode"]
    runners = [_runner(model_dir, attention_backend=n) for n in names]
    history = _teacher_forced(runners, [7, 100, 33], 6, [[0, 1, 2], [1]])
    for outs in history:
        assert all(used for _, used in outs)
        for logits, _ in outs[1:]:
            assert _close(logits, outs[0][0])


def test_pool_is_sized_from_free_memory(model_dir: str) -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    # The share is charged with what this process already holds (the runner reads
    # its own allocator): here, whatever earlier tests of the session still keep.
    held_before = torch.cuda.memory_reserved()
    runner = _runner(model_dir, max_total_tokens=None, mem_fraction_static=0.1, cuda_graph_bs=(1,))
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    pool_bytes = runner.layout.total_bytes
    budget = 0.1 * free_before - held_before
    assert budget - weights - (1 << 30) < pool_bytes + weights <= budget * 1.01
    assert abs(runner.info().available_gpu_mem_gb - torch.cuda.mem_get_info()[0] / (1 << 30)) < 0.5


def test_weights_export_path_unused_on_gpu_is_dtype_clean(model_dir: str) -> None:
    runner = _runner(model_dir, cuda_graph_bs=(1,))
    assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
    assert runner.model.model.rotary.cos_cache.dtype == torch.float32
    assert Path(model_dir, "config.json").exists()
