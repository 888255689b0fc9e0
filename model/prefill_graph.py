"""CUDA graphs for prefill steps: one graph per token count, any batch within it.

Launching a prefill forward from Python costs the host about as much per
layer whatever the prompt's length (~0.75 ms a layer on an 8B shape), so
without graphs every prompt under a few thousand tokens waits on the host.
Here the whole forward, attention included, is captured once per token
count of a ladder; a step of ``T`` new tokens over at most ``max_seqs``
sequences replays the graph of the smallest count ``>= T``.

What makes one graph serve every batch of its token count:
- inputs live in fixed buffers (:class:`PackedBuffers`), filled with one copy;
- padding tokens feed token 0 at position 0 and store no KV (slot -1); rows
  are independent in every operation, so they touch no real token;
- attention is the tiled extend kernel, whose grid is a fixed number of
  query tiles and which reads each tile's (sequence, block) from a table;
- logits come out for ``max_seqs`` rows, of which the step's are kept.

Graphs are captured largest first and share one memory pool, so their
activations cost about one forward of the largest count (logged at start).
"""

from __future__ import annotations

import bisect
import logging
from functools import partial

import torch
from pdserve.model.attention.base import AttentionBackend
from pdserve.model.cuda_graph import PackedBuffers, capture_graph
from pdserve.model.forward_batch import ForwardBatch
from pdserve.model.kernels import reference
from pdserve.model.kernels.step_inputs import StepInputs, build_step, max_tiles, tile_table
from pdserve.model.kernels.tilings import query_block

logger = logging.getLogger("pdserve.cuda_graph")


# The default chunk size. Past 2048 tokens a graph no longer shortens the step
# (the GPU outlasts an eager launch), but an eager launch still held the host
# for up to 0.49 of an 8192-token step's GPU span on the 1B shape (four
# prompts; benchmarks/results/README.md). Captured up to here, no step of the
# default chunking takes the host more than a few percent of its GPU time,
# for about one forward's activations (1.35 GiB on the 8B shape, logged).
PREFILL_GRAPH_DEFAULT_MAX_TOKENS = 8192


def prefill_graph_max_tokens(configured: int | None, chunked_prefill_size: int, context_len: int) -> int:
    """The largest token count to capture: ``--prefill-cuda-graph-max-tokens``
    if given, else the chunk size (the context without chunking) up to the
    default; never past the context, because each count is captured as one
    sequence whose positions must lie in the rotary table."""
    chunk = chunked_prefill_size if chunked_prefill_size > 0 else context_len
    return min(configured or min(chunk, PREFILL_GRAPH_DEFAULT_MAX_TOKENS), context_len)


def prefill_token_counts(max_tokens: int) -> list[int]:
    """Token counts to capture up to ``max_tokens``: fine steps where padding
    would cost most, coarser where steps are long (at most ~1/8 padded above 512)."""
    ladder = [16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    ladder += list(range(640, 1025, 128)) + list(range(1280, 2049, 256))
    ladder += list(range(2560, 4097, 512)) + list(range(5120, 16385, 1024))
    counts = [n for n in ladder if n < max_tokens] + [max_tokens]
    return sorted(set(counts))


class PrefillInputs(PackedBuffers):
    """Every input of a prefill graph replay: per token (ids, positions, KV
    slots), per sequence (query and page offsets, lengths, logit rows), the
    tile table, then the page ids last."""

    def __init__(self, max_tokens: int, max_seqs: int, max_pages: int, num_tiles: int, device: torch.device):
        sizes = {"input_ids": max_tokens, "positions": max_tokens, "out_slots": max_tokens,
                 "qo_indptr": max_seqs + 1, "kv_indptr": max_seqs + 1, "seq_lens": max_seqs,
                 "logits_indices": max_seqs, "tile_seq": num_tiles, "tile_block": num_tiles, "kv_indices": max_pages}
        super().__init__(sizes, device)
        self.max_tokens, self.max_seqs, self.max_pages = max_tokens, max_seqs, max_pages

    def load(self, step: StepInputs, num_tokens: int, num_tiles: int, block_m: int) -> None:
        """Write ``step`` padded to ``num_tokens`` tokens and ``max_seqs`` sequences; copy it."""
        self.wait_host_free()
        s = self.max_seqs
        self.put("input_ids", step.input_ids, num_tokens)
        self.put("positions", step.positions, num_tokens)
        self.put("out_slots", step.out_slots, num_tokens, pad=-1)
        self.put("qo_indptr", step.qo_indptr, s + 1, pad=int(step.qo_indptr[-1]))
        self.put("kv_indptr", step.kv_indptr, s + 1, pad=int(step.kv_indptr[-1]))
        self.put("seq_lens", step.seq_lens, s)
        self.put("logits_indices", step.logits_indices, s)
        tile_seq, tile_block = tile_table(step.qo_indptr, block_m, num_tiles)
        self.put("tile_seq", tile_seq, num_tiles)
        self.put("tile_block", tile_block, num_tiles)
        self.put("kv_indices", step.kv_indices, step.kv_indices.shape[0])
        self.copy_prefix(self.offsets["kv_indices"] + step.kv_indices.shape[0])
        self.mark_copied()


class TiledExtendAttention(AttentionBackend):
    """Prefill attention inside a prefill graph: the tiled extend kernel over
    the graph's fixed buffers (on CPU its PyTorch reference, which runs the
    same forward uncaptured). K/V given here are stored except at slot -1."""

    accepts_stored_kv = True

    def __init__(self, inputs: PrefillInputs, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 block_m: int, device: torch.device):
        super().__init__(num_heads, num_kv_heads, head_dim, page_size)
        self.inputs = inputs
        if device.type == "cuda":
            from pdserve.model.kernels import prefill_attention

            self._kernel = prefill_attention.extend_attention_tiled
        else:
            self._kernel = partial(reference.extend_attention_tiled, block_m=block_m)

    def prepare(self, batch: ForwardBatch) -> None:
        raise RuntimeError("a prefill graph's metadata lives in its fixed buffers")

    def forward(self, batch, q, k, v, k_cache, v_cache):
        if k is not None:
            keep = batch.out_slots >= 0
            reference.store_kv(k[keep], v[keep], k_cache, v_cache, batch.out_slots[keep])
        view, s, tiles = self.inputs.device_view, self.inputs.max_seqs, batch.attn
        return self._kernel(q, torch.empty_like(q), k_cache, v_cache, view("qo_indptr", s + 1),
                            view("kv_indptr", s + 1), view("kv_indices", self.inputs.max_pages), view("seq_lens", s),
                            view("tile_seq", tiles), view("tile_block", tiles), self.scale)


class PrefillGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_buffer: torch.Tensor, counts: list[int], max_seqs: int,
                 max_pages: int, page_size: int, device: torch.device):
        cfg = model.config
        self.model, self.kv_buffer, self.counts = model, kv_buffer, counts
        self.max_seqs, self.page_size = max_seqs, page_size
        plan = model.plan  # this rank's heads: the kernel groups them per kv head
        self.block_m = query_block(cfg.head_dim, plan.num_heads // plan.num_kv_heads)
        self.inputs = PrefillInputs(counts[-1], max_seqs, max_pages, self._tiles(counts[-1]), device)
        self.attn = TiledExtendAttention(self.inputs, plan.num_heads, plan.num_kv_heads, cfg.head_dim, page_size,
                                         self.block_m, device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.memory_bytes = 0

    def _tiles(self, num_tokens: int) -> int:
        return max_tiles(num_tokens, self.max_seqs, self.block_m)

    def count_for(self, step: StepInputs) -> int | None:
        """The captured token count ``step`` replays, or None when it runs eagerly."""
        if step.batch_size > self.max_seqs or step.kv_indices.shape[0] > self.inputs.max_pages:
            return None
        i = bisect.bisect_left(self.counts, step.num_tokens)
        return self.counts[i] if i < len(self.counts) else None

    def _batch(self, num_tokens: int) -> ForwardBatch:
        view, s = self.inputs.device_view, self.max_seqs
        fb = ForwardBatch(False, view("input_ids", num_tokens), view("positions", num_tokens),
                          view("out_slots", num_tokens), [1] * s, [1] * s, [[0]] * s, view("logits_indices", s))
        fb.attn = self._tiles(num_tokens)  # the tile count this graph launches
        return fb

    @torch.inference_mode()
    def capture(self) -> None:
        free_before = torch.cuda.mem_get_info()[0]
        stream, pool = torch.cuda.Stream(), None
        for count in reversed(self.counts):
            self._load(_dummy_step(count, self.page_size), count)
            fb = self._batch(count)
            graph, out = capture_graph(lambda fb=fb: self.model(fb, self.attn, self.kv_buffer), stream, pool)
            pool = graph.pool()
            self._graphs[count], self._outputs[count] = graph, out
        torch.cuda.synchronize()
        self.memory_bytes = max(free_before - torch.cuda.mem_get_info()[0], 0)
        logger.info("Captured prefill CUDA graphs for %d token counts up to %d (%d sequences at most): %.2f GiB "
                    "(--disable-prefill-cuda-graph leaves it free)", len(self.counts), self.counts[-1], self.max_seqs,
                    self.memory_bytes / (1 << 30))

    def _load(self, step: StepInputs, count: int) -> None:
        self.inputs.load(step, count, self._tiles(count), self.block_m)

    def replay(self, step: StepInputs, count: int) -> torch.Tensor:
        """Logits ``[step.batch_size, vocab]`` of a prefill step; before
        :meth:`capture` (CPU) the same forward runs uncaptured."""
        self._load(step, count)
        graph = self._graphs.get(count)
        if graph is None:
            with torch.inference_mode():
                return self.model(self._batch(count), self.attn, self.kv_buffer)[: step.batch_size]
        graph.replay()
        return self._outputs[count][: step.batch_size]


def _dummy_step(num_tokens: int, page_size: int) -> StepInputs:
    """One sequence of ``num_tokens`` tokens on page 0 that stores no KV:
    safe to run for real while capturing."""
    pages = [0] * -(-num_tokens // page_size)
    step = build_step(False, [[0] * num_tokens], [0], [pages], page_size)
    step.out_slots[:] = -1
    return step


def prefill_graph_pages(max_seqs: int, context_len: int, page_size: int, num_pages: int) -> int:
    """Page ids a prefill graph's index holds: every sequence at full context,
    within what the pool can hand out (prefix pages may repeat across sequences)."""
    per_seq = min(-(-context_len // page_size), num_pages)
    return max_seqs * per_seq

