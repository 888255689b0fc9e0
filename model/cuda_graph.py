"""CUDA graphs for decode batches: capture once per batch size, replay per step.

A decode step of batch ``b`` replays the graph of the smallest captured size
``>= b`` (or of exactly ``b`` with ``--disable-cuda-graph-padding``); padding
rows are one-token sequences whose KV is never stored and whose logits are
dropped. Inputs live in fixed buffers; the attention backend re-points its
own fixed index buffers at the real batch (``graph_metadata``) before each
replay. Graphs share one memory pool and are captured largest first.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pdserve.model.forward_batch import ForwardBatch
from pdserve.model.kernels.step_inputs import StepInputs, build_step, feed_tokens

logger = logging.getLogger("pdserve.cuda_graph")

DEFAULT_MAX_BS = 256


def capture_batch_sizes(max_bs: int | None, explicit: tuple[int, ...] | None) -> list[int]:
    """Sizes to capture: ``explicit`` (clipped to ``max_bs``), else SGLang's ladder
    1, 2, 4, 8, then every 8 to 64, then every 16 up to ``max_bs``."""
    limit = max_bs or DEFAULT_MAX_BS
    if explicit:
        sizes = {b for b in explicit if 0 < b <= limit}
    else:
        sizes = {1, 2, 4, 8} | set(range(16, 65, 8)) | set(range(80, limit + 1, 16)) | {limit}
        sizes = {b for b in sizes if b <= limit}
    if not sizes:
        raise ValueError(f"no CUDA graph batch sizes within --cuda-graph-max-bs {limit}")
    return sorted(sizes)


def padded_batch_size(batch_size: int, sizes: list[int], allow_padding: bool) -> int | None:
    """The captured size a batch replays, or None when it must run eagerly."""
    i = bisect.bisect_left(sizes, batch_size)
    if i == len(sizes):
        return None
    if sizes[i] != batch_size and not allow_padding:
        return None
    return sizes[i]


def _dummy_step(batch_size: int, page_size: int) -> StepInputs:
    """One token per sequence on page 0 with no KV store: safe to run for real."""
    step = build_step(True, [[0]] * batch_size, [0] * batch_size, [[0]] * batch_size, page_size)
    step.out_slots[:] = -1
    return step


def capture_graph(run: Callable[[], torch.Tensor], stream: torch.cuda.Stream,
                  pool: Any) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture ``run`` on ``stream`` into a graph sharing memory ``pool``;
    the graph and the output tensor its replays write."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile kernels, create handles: nothing may do that inside capture
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = run()
    return graph, out


class PackedBuffers:
    """Fixed int32 device buffers in one block, filled from one pinned host
    block of the same layout with a single copy per step. Fields lie in the
    order given; a step copies only the prefix it uses."""

    def __init__(self, sizes: dict[str, int], device: torch.device):
        self.offsets: dict[str, int] = {}
        at = 0
        for name, size in sizes.items():
            self.offsets[name] = at
            at += size
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(at, dtype=torch.int32, pin_memory=on_gpu)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros_like(self.host, device=device)
        self._copied = torch.cuda.Event() if on_gpu else None

    def device_view(self, name: str, length: int) -> torch.Tensor:
        return self.dev[self.offsets[name] : self.offsets[name] + length]

    def host_view(self, name: str, length: int) -> torch.Tensor:
        return self.host[self.offsets[name] : self.offsets[name] + length]

    def put(self, name: str, values: np.ndarray, length: int, pad: int = 0) -> None:
        """``values`` at the start of field ``name``, then ``pad`` up to ``length``."""
        at, n = self.offsets[name], values.shape[0]
        self.host_np[at : at + n] = values
        self.host_np[at + n : at + length] = pad

    def wait_host_free(self) -> None:
        """Until the previous step's copies have read the host block."""
        if self._copied is not None:
            self._copied.synchronize()

    def copy_prefix(self, end: int) -> None:
        self.dev[:end].copy_(self.host[:end], non_blocking=True)

    def mark_copied(self) -> None:
        """Call once everything that reads the host block (the copy, an
        attention plan) has been enqueued."""
        if self._copied is not None:
            self._copied.record()


class GraphInputs(PackedBuffers):
    """Every input of a decode graph replay in one :class:`PackedBuffers`.

    Layout: ids, positions, out_slots, kv_indptr, kv_last_page_len, seq_lens,
    token_src (``max_bs`` each, indptr one more), then kv_indices
    (``max_pages``) last. ``token_src[i] >= 0`` says row ``i``'s token is
    still on the device, at that index of the previous step's sampled tokens
    (see ``ModelRunner.launch_ahead``)."""

    FIELDS = ("input_ids", "positions", "out_slots", "kv_indptr", "kv_last_page_len", "seq_lens", "token_src")

    def __init__(self, max_bs: int, max_pages: int, device: torch.device):
        super().__init__({**{name: max_bs + 1 for name in self.FIELDS}, "kv_indices": max_pages}, device)
        self.max_bs, self.max_pages = max_bs, max_pages

    def num_indices(self, padded_bs: int) -> int:
        """Page ids in use after :meth:`load` of a ``padded_bs`` step."""
        return int(self.host_np[self.offsets["kv_indptr"] + padded_bs])

    def load(self, step: StepInputs, padded_bs: int, token_src: np.ndarray | None = None) -> None:
        """Write ``step`` padded to ``padded_bs`` rows and copy it to the device.
        The caller calls :meth:`mark_copied` once everything that reads the
        host buffer (this copy, an attention plan) has been enqueued."""
        self.wait_host_free()
        h, o, bs = self.host_np, self.offsets, step.batch_size
        h[o["token_src"] : o["token_src"] + bs] = -1 if token_src is None else token_src
        nnz = int(step.kv_indptr[-1])
        for name, values, pad in (("input_ids", step.input_ids, 0), ("positions", step.positions, 0),
                                  ("out_slots", step.out_slots, -1), ("kv_last_page_len", step.kv_last_page_len, 1),
                                  ("seq_lens", step.seq_lens, 1)):
            self.put(name, values, padded_bs, pad)
        h[o["kv_indptr"] : o["kv_indptr"] + bs + 1] = step.kv_indptr
        h[o["kv_indptr"] + bs + 1 : o["kv_indptr"] + padded_bs + 1] = nnz + np.arange(1, padded_bs - bs + 1)
        end = o["kv_indices"] + nnz + padded_bs - bs
        h[o["kv_indices"] : o["kv_indices"] + nnz] = step.kv_indices
        h[o["kv_indices"] + nnz : end] = 0
        self.copy_prefix(end)


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, attn: Any, kv_buffer: torch.Tensor, sizes: list[int],
                 allow_padding: bool, max_num_pages: int, page_size: int, device: torch.device):
        self.model, self.attn, self.kv_buffer = model, attn, kv_buffer
        self.sizes, self.allow_padding, self.page_size = sizes, allow_padding, page_size
        max_bs = sizes[-1]
        self.inputs = GraphInputs(max_bs, max_num_pages + max_bs, device)
        self._arange = torch.arange(max_bs, dtype=torch.long, device=device)
        attn.init_graph_state(self.inputs)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pool = None

    def padded_size(self, batch_size: int) -> int | None:
        return padded_batch_size(batch_size, self.sizes, self.allow_padding)

    def _batch(self, batch_size: int) -> ForwardBatch:
        view = self.inputs.device_view
        return ForwardBatch(True, view("input_ids", batch_size), view("positions", batch_size),
                            view("out_slots", batch_size), [1] * batch_size, [1] * batch_size,
                            [[0]] * batch_size, self._arange[:batch_size])

    @torch.inference_mode()
    def capture(self) -> None:
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):
            fb = self._batch(bs)
            step = _dummy_step(bs, self.page_size)
            self.inputs.load(step, bs)
            fb.attn = self.attn.graph_metadata(step, bs)
            self.inputs.mark_copied()
            graph, out = capture_graph(lambda fb=fb: self.model(fb, self.attn, self.kv_buffer), stream, self._pool)
            self._pool = graph.pool()
            self._graphs[bs], self._outputs[bs] = graph, out
        torch.cuda.synchronize()
        logger.info("Captured CUDA graphs for decode batch sizes %s", self.sizes)

    def replay(self, step: StepInputs, padded_bs: int, fed: tuple[np.ndarray, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits ``[step.batch_size, vocab]`` of a decode step.

        ``fed``: (token_src, tokens): rows with ``token_src >= 0`` take their
        input id from ``tokens`` on the device (the host does not know it yet)."""
        self.inputs.load(step, padded_bs, None if fed is None else fed[0])
        self.attn.graph_metadata(step, padded_bs)
        self.inputs.mark_copied()
        if fed is not None:
            bs = step.batch_size
            feed_tokens(self.inputs.device_view("input_ids", bs), self.inputs.device_view("token_src", bs), *fed)
        self._graphs[padded_bs].replay()
        return self._outputs[padded_bs][: step.batch_size]
