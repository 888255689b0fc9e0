"""The host side of prefill CUDA graphs (CPU): which steps replay which graph,
the tile table the fixed-grid attention reads, and the packed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pdserve.model.kernels.step_inputs import build_step, max_tiles, tile_table
from pdserve.model.prefill_graph import PrefillInputs, prefill_token_counts


def test_token_counts_cover_up_to_the_limit_with_bounded_padding() -> None:
    counts = prefill_token_counts(8192)
    assert counts[0] == 16 and counts[-1] == 8192 and counts == sorted(set(counts))
    for smaller, larger in zip(counts, counts[1:]):
        if smaller >= 512:  # a step just over a count pads at most ~1/8 (+ the step) above 512
            assert (larger - smaller) / larger <= 0.2, (smaller, larger)
    assert prefill_token_counts(1000)[-1] == 1000 and max(prefill_token_counts(1000)) == 1000
    assert prefill_token_counts(10) == [10]


@pytest.mark.parametrize("lengths", [[1], [64], [65], [100, 1, 200, 7], [32] * 5])
def test_tile_table_covers_every_query_block_once(lengths: list[int]) -> None:
    qo = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    num_tiles = max_tiles(int(qo[-1]) + 40, 8, 128)
    seq, block = tile_table(qo, 32, num_tiles)
    covered = [(int(s), int(b)) for s, b in zip(seq, block) if s >= 0]
    expected = [(i, b) for i, n in enumerate(lengths) for b in range(-(-n // 32))]
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
        needed = int((-(-lengths // 32)).sum())
        assert needed <= max_tiles(512, 8, 128)


def test_inputs_are_padded_in_place() -> None:
    inputs = PrefillInputs(max_tokens=64, max_seqs=4, max_pages=32, num_tiles=max_tiles(64, 4, 128),
                           device=torch.device("cpu"))
    step = build_step(False, [[5, 6, 7], [8, 9]], [4, 0], [[3, 1], [2]], page_size=4)
    inputs.load(step, 16, max_tiles(16, 4, 128), 32)
    view = lambda name, n: inputs.device_view(name, n).tolist()  # noqa: E731
    assert view("input_ids", 16) == [5, 6, 7, 8, 9] + [0] * 11
    assert view("positions", 16) == [4, 5, 6, 0, 1] + [0] * 11
    assert view("out_slots", 16) == [4, 5, 6, 8, 9] + [-1] * 11  # pages [3, 1] hold positions 4-6 on page 1
    assert view("qo_indptr", 5) == [0, 3, 5, 5, 5]
    assert view("kv_indptr", 5) == [0, 2, 3, 3, 3]
    assert view("seq_lens", 4) == [7, 2, 0, 0]
    assert view("logits_indices", 4) == [2, 4, 0, 0]
    assert view("kv_indices", 3) == [3, 1, 2]
    tiles = max_tiles(16, 4, 128)
    assert view("tile_seq", tiles) == [0, 1] + [-1] * (tiles - 2)
