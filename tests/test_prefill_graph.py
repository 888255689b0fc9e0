"""The host side of prefill CUDA graphs (CPU): which steps replay which graph,
the tile table the fixed-grid attention reads, and the packed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pdserve.model.kernels.step_inputs import build_step, max_tiles, tile_table
from pdserve.model.kernels.tilings import query_block
from pdserve.model.prefill_graph import (
    PrefillInputs,
    prefill_graph_max_tokens,
    prefill_token_counts,
)


def test_token_counts_cover_up_to_the_limit_with_bounded_padding() -> None:
    counts = prefill_token_counts(8192)
    assert counts[0] == 16 and counts[-1] == 8192 and counts == sorted(set(counts))
    for smaller, larger in zip(counts, counts[1:]):
        if smaller >= 512:  # a step just over a count pads at most ~1/8 (+ the step) above 512
            assert (larger - smaller) / larger <= 0.2, (smaller, larger)
    assert prefill_token_counts(1000)[-1] == 1000 and max(prefill_token_counts(1000)) == 1000
    assert prefill_token_counts(10) == [10]


def test_graphs_cover_the_default_chunk_unless_told_otherwise() -> None:
    # the default chunk of 8192 tokens is captured whole: an eager launch of
    # that many tokens held the host for up to half its GPU time on the 1B shape
    assert prefill_graph_max_tokens(None, 8192, 131072) == 8192
    assert prefill_graph_max_tokens(None, 1024, 131072) == 1024  # a smaller chunk caps the ladder too
    assert prefill_graph_max_tokens(None, -1, 131072) == 8192  # no chunking: capped, not the whole context
    assert prefill_graph_max_tokens(None, -1, 2048) == 2048
    assert prefill_graph_max_tokens(4096, 8192, 131072) == 4096  # --prefill-cuda-graph-max-tokens wins
    # a capture is one sequence of the count: its positions stay in a short context's rotary table
    assert prefill_graph_max_tokens(None, 8192, 2048) == 2048
    assert prefill_graph_max_tokens(4096, 8192, 2048) == 2048


@pytest.mark.parametrize("lengths", [[1], [64], [65], [128], [129], [100, 1, 200, 7], [32] * 5, [128] * 3])
def test_tile_table_covers_every_query_block_once(lengths: list[int]) -> None:
    qo = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    block_m = query_block(128, 4)
    num_tiles = max_tiles(int(qo[-1]) + 40, 8, block_m)
    seq, block = tile_table(qo, block_m, num_tiles)
    covered = [(int(s), int(b)) for s, b in zip(seq, block) if s >= 0]
    expected = [(i, b) for i, n in enumerate(lengths) for b in range(-(-n // block_m))]
    assert covered == expected
    assert (seq[len(expected):] == -1).all()


def test_tile_table_refuses_a_batch_it_cannot_cover() -> None:
    with pytest.raises(ValueError, match="query tiles"):
        tile_table(np.array([0, 100], dtype=np.int32), 32, 3)


def test_max_tiles_bounds_every_batch_of_that_size() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        seqs = int(rng.integers(1, 9))
        cuts = np.sort(rng.choice(np.arange(1, 512), size=seqs - 1, replace=False)) if seqs > 1 else np.array([], int)
        lengths = np.diff(np.concatenate([[0], cuts, [512]]))
        for block_m in (query_block(128, 1), query_block(64, 4), query_block(128, 7)):
            needed = int((-(-lengths // block_m)).sum())
            assert needed <= max_tiles(512, 8, block_m)


def test_inputs_are_padded_in_place() -> None:
    inputs = PrefillInputs(max_tokens=64, max_seqs=4, max_pages=32, num_tiles=max_tiles(64, 4, 32),
                           device=torch.device("cpu"))
    step = build_step(False, [[5, 6, 7], [8, 9]], [4, 0], [[3, 1], [2]], page_size=4)
    inputs.load(step, 16, max_tiles(16, 4, 32), 32)
    view = lambda name, n: inputs.device_view(name, n).tolist()  # noqa: E731
    assert view("input_ids", 16) == [5, 6, 7, 8, 9] + [0] * 11
    assert view("positions", 16) == [4, 5, 6, 0, 1] + [0] * 11
    assert view("out_slots", 16) == [4, 5, 6, 8, 9] + [-1] * 11  # pages [3, 1] hold positions 4-6 on page 1
    assert view("qo_indptr", 5) == [0, 3, 5, 5, 5]
    assert view("kv_indptr", 5) == [0, 2, 3, 3, 3]
    assert view("seq_lens", 4) == [7, 2, 0, 0]
    assert view("logits_indices", 4) == [2, 4, 0, 0]
    assert view("kv_indices", 3) == [3, 1, 2]
    tiles = max_tiles(16, 4, 32)
    assert view("tile_seq", tiles) == [0, 1] + [-1] * (tiles - 2)


@pytest.fixture(scope="module")
def cpu_runner(tmp_path_factory: pytest.TempPathFactory):
    from pdserve.common.config import ServerConfig
    from pdserve.model.config import ModelConfig
    from pdserve.model.runner import ModelRunner
    from pdserve.tests.support.small_models import small_llama_dir

    model_dir = small_llama_dir(tmp_path_factory.mktemp("cfg"))
    cfg = ServerConfig(model_path=model_dir, load_format="dummy", max_total_tokens=4096, page_size=4)
    return ModelRunner(cfg, model_dir, ModelConfig.from_dir(model_dir))


def _reqs(runner, lengths: list[int], seed: int) -> list:
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.engine.request import Req

    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i, n in enumerate(lengths):
        req = Req(str(i), torch.randint(0, 1000, (n,), generator=g).tolist(), SamplingParams(temperature=0))
        req.pages = runner.pool.alloc(-(-n // runner.cfg.page_size))
        reqs.append(req)
    return reqs


@pytest.mark.parametrize("lengths, prefix", [([37], 0), ([5, 17, 70], 0), ([1], 0), ([90, 41], 33)])
def test_graph_forward_over_fixed_buffers_equals_eager(cpu_runner, lengths: list[int], prefix: int) -> None:
    """The forward a prefill graph captures, run uncaptured on CPU over its
    padded fixed buffers: eager's logits, and the same KV stored, padding
    stored nowhere; over a cached prefix as well."""
    from pdserve.model.batch import ScheduledBatch
    from pdserve.model.prefill_graph import PrefillGraphRunner

    runner = cpu_runner
    graphs = PrefillGraphRunner(runner.model, runner.pool.buffer, [16, 64, 256], 4, 256, runner.cfg.page_size,
                                torch.device("cpu"))
    results = []
    for use_graph in (False, True):
        reqs = _reqs(runner, lengths, seed=sum(lengths))
        if prefix:  # the cached prefixes, eagerly, on both
            runner.forward(ScheduledBatch(False, reqs, [r.prompt_ids[:prefix] for r in reqs], [0] * len(reqs)))
        before = runner.pool.buffer.clone()
        batch = ScheduledBatch(False, reqs, [r.prompt_ids[prefix:] for r in reqs], [prefix] * len(reqs))
        if use_graph:
            step = runner._step_inputs(batch)
            count = graphs.count_for(step)
            assert count is not None and count >= step.num_tokens
            logits = graphs.replay(step, count)
        else:
            logits = runner.forward(batch)
        pages = torch.tensor(sorted({p for r in reqs for p in r.pages}))
        changed = (runner.pool.buffer != before).flatten(3).any(-1).any(0).any(0).nonzero().flatten()
        assert set(changed.tolist()) <= set(pages.tolist())  # nothing stored outside the batch's pages
        results.append((logits.clone(), runner.pool.buffer[:, :, pages].clone()))
        runner.pool.release(pages.tolist())
    (eager_logits, eager_kv), (graph_logits, graph_kv) = results
    assert graph_logits.shape == (len(lengths), runner.model_cfg.vocab_size)
    torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(graph_kv, eager_kv, rtol=1e-5, atol=1e-5)


def test_batches_a_graph_cannot_take_run_eagerly(cpu_runner) -> None:
    from pdserve.model.batch import ScheduledBatch
    from pdserve.model.prefill_graph import PrefillGraphRunner

    runner = cpu_runner
    graphs = PrefillGraphRunner(runner.model, runner.pool.buffer, [16, 64], 2, 20, runner.cfg.page_size,
                                torch.device("cpu"))

    def count(lengths: list[int], prefix: int = 0):
        reqs = _reqs(runner, lengths, 0)
        step = runner._step_inputs(ScheduledBatch(False, reqs, [r.prompt_ids[prefix:] for r in reqs],
                                                  [prefix] * len(reqs)))
        runner.pool.release([p for r in reqs for p in r.pages])
        return graphs.count_for(step)

    assert count([10]) == 16 and count([17]) == 64 and count([30, 34]) == 64 and count([70], prefix=60) == 16
    assert count([65]) is None  # more tokens than the largest graph
    assert count([3, 3, 3]) is None  # more sequences than a graph takes
    assert count([90], prefix=80) is None  # 23 pages: more page ids than the index holds


def test_eager_warmups_cover_odd_aligned_and_prefixed_prefills_that_fit() -> None:
    from pdserve.model.runner import WarmPrefill, eager_prefill_warmups

    shapes = eager_prefill_warmups(2049, page_size=16, free_pages=10_000, context_len=8192)
    assert shapes == [WarmPrefill((2049,), (0,)), WarmPrefill((2064,), (0,)), WarmPrefill((2049,), (2049,))]
    # a context shorter than the prompt: split over sequences that leave room for a prefix as long
    short = eager_prefill_warmups(2049, page_size=16, free_pages=10_000, context_len=1088)
    assert short == [WarmPrefill((513, 512, 512, 512), (0,) * 4), WarmPrefill((516,) * 4, (0,) * 4),
                     WarmPrefill((513, 512, 512, 512), (513, 512, 512, 512))]
    for context_len in (1088, 8192):
        for w in eager_prefill_warmups(2049, 16, 10_000, context_len):
            assert sum(w.lengths) >= 2049 and all(n + p <= context_len for n, p in zip(w.lengths, w.prefixes))
    # a pool of 140 pages takes the two 129-page prompts, not the 258 pages of the prefixed one
    assert [w.lengths for w in eager_prefill_warmups(2049, 16, 140, 8192)] == [(2049,), (2064,)]


def test_warm_eager_prefill_runs_each_shape_eagerly_and_frees_its_pages(cpu_runner) -> None:
    runner = cpu_runner
    seen = []
    free_before = runner.pool.num_free_pages
    runner.step_hook = lambda batch: seen.append(([len(c) for c in batch.chunks], list(batch.starts)))
    try:
        shapes = runner.warm_eager_prefill()
    finally:
        runner.step_hook = None
    assert shapes and seen == [(list(w.lengths), list(w.prefixes)) for w in shapes]
    assert runner.pool.num_free_pages == free_before
    assert all(runner.pool.ref_count(p) == 0 for p in range(runner.layout.num_pages))
