"""Loads the model, sizes the KV pool, and runs one forward step.

All device-specific choices (dtype, pool size, attention backend, CUDA graphs)
are resolved here once at start and logged in SGLang's words.

On GPU a step's inputs are built on the host with numpy (``step_inputs``) and
a decode step replays a CUDA graph when one fits.

The overlap schedule (GPU default; ``--disable-overlap-schedule``) keeps the
GPU from waiting on the host between decode steps. Once step N's tokens are
sampled on the device, the engine calls :meth:`ModelRunner.launch_ahead`,
which enqueues step N+1 with those tokens as its input ids, and only then
waits for step N's tokens on the host. The next ``take_ahead`` hands over
step N+1's logits for the requests still running: one that finished at step
N is simply not asked for, and the page its extra token was written to is
fenced in the pool until that step is done.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pdserve.common.config import ServerConfig, rendezvous_address
from pdserve.common.kv_layout import KVLayout
from pdserve.model.attention.base import ATTENTION_BACKENDS, create_attention_backend
from pdserve.model.batch import ScheduledBatch
from pdserve.model.config import ModelConfig
from pdserve.model.cuda_graph import CudaGraphRunner, capture_batch_sizes
from pdserve.model.forward_batch import ForwardBatch, build_forward_batch
from pdserve.model.kernels.ops import create_ops, pdl_enabled
from pdserve.model.kernels.step_inputs import StepInputs, build_step, feed_tokens, to_device
from pdserve.model.kv_pool import KVPool
from pdserve.model.page_tables import PageTables
from pdserve.model.parallel import ShardPlan, TPGroup
from pdserve.model.prefill_graph import (
    PrefillGraphRunner,
    prefill_graph_max_tokens,
    prefill_graph_pages,
    prefill_token_counts,
)
from pdserve.model.weights import load_model, resolve_dtype

logger = logging.getLogger("pdserve.model_runner")

CPU_KV_BUDGET_BYTES = 512 << 20  # default CPU pool: 512 MiB of KV
DEFAULT_MEM_FRACTION_STATIC = 0.85


@dataclass(frozen=True)
class WarmPrefill:
    """One eager prefill run at start-up: new tokens and cached tokens before them, per sequence."""

    lengths: tuple[int, ...]
    prefixes: tuple[int, ...]

    def num_pages(self, page_size: int) -> int:
        return sum(-(-(n + p) // page_size) for n, p in zip(self.lengths, self.prefixes))


def eager_prefill_warmups(first_eager_tokens: int, page_size: int, free_pages: int, context_len: int) -> list[WarmPrefill]:
    """The eager prefills start-up runs: as many tokens as the first count past
    the prefill graphs (odd), a multiple of 16 tokens, and the first count again
    over cached prefixes as long as each chunk; split into as many sequences as
    the context needs (up to half of it each, to leave room for the prefix).
    Each only if it fits the pool."""
    seq_cap = max(context_len // 2, 1)

    def split(total: int) -> tuple[int, ...]:
        parts = -(-total // seq_cap)
        base, extra = divmod(total, parts)
        return tuple(base + (i < extra) for i in range(parts))

    odd, aligned = split(first_eager_tokens | 1), split(-(-first_eager_tokens // 16) * 16)
    shapes = [WarmPrefill(odd, (0,) * len(odd)), WarmPrefill(aligned, (0,) * len(aligned)), WarmPrefill(odd, odd)]
    return [w for w in shapes if w.num_pages(page_size) <= free_pages]


@dataclass
class _WarmRequest:
    pages: list[int]


def resolve_device(requested: str, base_gpu_id: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        torch.cuda.set_device(base_gpu_id)
        return torch.device("cuda", base_gpu_id)
    return torch.device("cpu")


class _Done:
    """The guard of a step that ran synchronously (CPU)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


@dataclass
class _Ahead:
    """A decode step launched before the host knew its input tokens."""

    reqs: list
    starts: list[int]  # position of each row's token
    logits: torch.Tensor
    done: torch.cuda.Event | _Done
    used_graph: bool


@dataclass(frozen=True)
class RunnerInfo:
    max_total_num_tokens: int
    context_len: int
    dtype: str
    device: str
    available_gpu_mem_gb: float
    attention_backend: str


def _register_kernel_backends() -> dict[str, str]:
    """Load the backends that need GPU libraries; why each that failed did."""
    failed = {}
    for name in ("flashinfer", "triton"):
        try:
            ATTENTION_BACKENDS.get(name)
        except Exception as exc:  # a broken GPU library must not stop CPU or other backends
            failed[name] = f"{type(exc).__name__}: {exc}"
    return failed


def _default_backend(device: torch.device, failed: dict[str, str]) -> str:
    if device.type != "cuda":
        return "torch"
    if "flashinfer" in failed:
        logger.warning("flashinfer is unavailable (%s); using the triton attention backend", failed["flashinfer"])
        return "triton" if "triton" not in failed else "torch"
    return "flashinfer"


class ModelRunner:
    def __init__(self, cfg: ServerConfig, model_dir: str, model_cfg: ModelConfig, rank: int = 0):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = resolve_device(cfg.device, cfg.base_gpu_id + rank * cfg.gpu_id_step)
        self.tp = TPGroup.init(rank, cfg.tp_size, rendezvous_address(cfg), self.device, cfg.dist_timeout_s)
        self.plan = ShardPlan.of(model_cfg, rank, cfg.tp_size)
        # Rank 0 hands each step to the other ranks before running it (engine/tp.py).
        self.step_hook: Callable[[ScheduledBatch], None] | None = None
        self.dtype = resolve_dtype(cfg.dtype, model_cfg, self.device)
        self.context_len = min(cfg.context_length or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
        if cfg.context_length and cfg.context_length > model_cfg.max_position_embeddings:
            logger.warning("context_length %d exceeds the model's %d; using the model's", cfg.context_length, self.context_len)
        # SGLang sizes the pool against the memory that was free before loading.
        self._free_at_start = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self._free_at_start = torch.cuda.mem_get_info(self.device)[0]
        torch.manual_seed(cfg.random_seed)
        self.model = load_model(model_cfg, model_dir, cfg.load_format, self.dtype, self.device, self.context_len + 1,
                                cfg.random_seed, self.tp)
        self.pdl = pdl_enabled(self.device, cfg.disable_pdl)
        self.model.ops = create_ops(self.device, self.pdl)
        self.layout = self._size_pool()
        self.pool = KVPool(self.layout, self.dtype, self.device)
        failed = _register_kernel_backends()
        self.attn_backend_name = cfg.attention_backend or _default_backend(self.device, failed)
        if self.attn_backend_name in failed:
            raise ValueError(f"attention backend {self.attn_backend_name!r} is unavailable: {failed[self.attn_backend_name]}")
        self.attn = create_attention_backend(
            self.attn_backend_name,
            num_heads=self.plan.num_heads,
            num_kv_heads=self.plan.num_kv_heads,
            head_dim=model_cfg.head_dim,
            page_size=cfg.page_size,
            device=self.device,
            dtype=self.dtype,
            pdl=self.pdl,
        )
        # The fast path: numpy-built step inputs handed to a kernel backend.
        self._fast = self.device.type == "cuda" and self.attn.accepts_stored_kv
        # Page lists mirrored across steps. A follower rank gets new lists with
        # every step (engine/tp.py): it flattens them instead.
        self.page_tables = PageTables() if rank == 0 else None
        # Launching decode steps ahead pays off where launches are asynchronous.
        # Under TP the step inputs travel to the other ranks on the host, so
        # neither a step launched ahead nor a captured graph applies (yet).
        self.lookahead = self.device.type == "cuda" and not cfg.disable_overlap_schedule and self.tp.size == 1
        self._ahead: _Ahead | None = None
        self.uses_cuda_graph = False
        self.graphs = self._capture_graphs()
        self.prefill_graphs = self._capture_prefill_graphs()
        if self._fast and self.tp.size == 1:  # under TP the other ranks join only once the engine runs
            began = time.perf_counter()
            warmed = self.warm_eager_prefill()
            logger.info("eager prefills warmed (%s tokens) in %.2f s", ", ".join(
                "+".join(map(str, w.lengths)) for w in warmed) or "none fit", time.perf_counter() - began)

    def _capture_graphs(self) -> CudaGraphRunner | None:
        if not self._fast or self.cfg.disable_cuda_graph or not self.attn.supports_cuda_graph or self.tp.size > 1:
            return None
        cfg = self.cfg
        max_bs = cfg.cuda_graph_max_bs or min(cfg.max_running_requests or 256, 256)
        sizes = capture_batch_sizes(max_bs, cfg.cuda_graph_bs)
        pages_per_seq = -(-self.context_len // cfg.page_size)
        max_pages = sizes[-1] * min(pages_per_seq, self.layout.num_pages) + sizes[-1]
        runner = CudaGraphRunner(self.model, self.attn, self.pool.buffer, sizes, not cfg.disable_cuda_graph_padding,
                                 max_pages, cfg.page_size, self.device)
        runner.capture()
        return runner

    def _capture_prefill_graphs(self) -> PrefillGraphRunner | None:
        cfg = self.cfg
        # Under TP the step travels to the other ranks on the host: no graphs there (yet).
        if (not self._fast or cfg.disable_prefill_cuda_graph or cfg.disable_cuda_graph
                or not self.model.ops.fuses_rope_store or self.tp.size > 1):
            return None
        max_tokens = prefill_graph_max_tokens(cfg.prefill_cuda_graph_max_tokens, cfg.chunked_prefill_size,
                                              self.context_len)
        max_pages = prefill_graph_pages(cfg.prefill_cuda_graph_max_seqs, self.context_len, cfg.page_size,
                                        self.layout.num_pages)
        runner = PrefillGraphRunner(self.model, self.pool.buffer, prefill_token_counts(max_tokens),
                                    cfg.prefill_cuda_graph_max_seqs, max_pages, cfg.page_size, self.device)
        runner.capture()
        return runner

    @torch.inference_mode()
    def warm_eager_prefill(self) -> list[WarmPrefill]:
        """Run the prefills that no graph covers once, on scratch pages, before
        serving. A Triton kernel compiles on its first launch with each new
        specialization (~0.5 s each): without this, the first wave of long or
        batched prompts after a start stalled its first prefill step by that
        much. Returns what ran."""
        first_eager = max(self.prefill_graphs.counts) + 1 if self.prefill_graphs is not None else 2 * self.cfg.page_size
        shapes = eager_prefill_warmups(first_eager, self.cfg.page_size, self.pool.num_free_pages, self.context_len)
        saved, self.prefill_graphs = self.prefill_graphs, None  # eager even where a graph would fit
        try:
            for shape in shapes:
                reqs = [_WarmRequest(self.pool.alloc(-(-(n + p) // self.cfg.page_size)))
                        for n, p in zip(shape.lengths, shape.prefixes)]
                try:
                    self.forward(ScheduledBatch(False, reqs, [[0] * n for n in shape.lengths], list(shape.prefixes)))
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                finally:
                    for req in reqs:
                        self.pool.release(req.pages)
        finally:
            self.prefill_graphs = saved
        return shapes

    def _bytes_per_token(self) -> int:
        m = self.model_cfg
        return m.num_layers * 2 * self.plan.num_kv_heads * m.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def _size_pool(self) -> KVLayout:
        tokens = self.cfg.max_total_tokens
        if tokens is None:
            tokens = self._auto_pool_tokens()
        # Rank 0 allocates pages for all ranks: every rank's pool has the smallest's size.
        num_pages = self.tp.all_reduce_min(max(tokens // self.cfg.page_size, 1))
        m, plan = self.model_cfg, self.plan
        dtype_name = str(self.dtype).removeprefix("torch.")
        return KVLayout(num_layers=m.num_layers, num_pages=num_pages, page_size=self.cfg.page_size,
                        num_kv_heads=plan.num_kv_heads, head_dim=m.head_dim, dtype=dtype_name,
                        head_start=plan.kv_head_start, total_kv_heads=m.num_kv_heads)

    def _auto_pool_tokens(self) -> int:
        per_token = self._bytes_per_token()
        if self.device.type == "cpu":
            return max(min(CPU_KV_BUDGET_BYTES // per_token, 1 << 17), self.cfg.page_size)
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        fraction = self.cfg.mem_fraction_static or DEFAULT_MEM_FRACTION_STATIC
        # SGLang's rule: weights + pool may take `fraction` of the memory that was
        # free at start (so instances sharing a GPU each size against their share);
        # the rest is left for activations, CUDA graphs and workspaces. What this
        # process holds is read from its own allocator, not from the free memory
        # now, so a neighbour starting at the same time is not charged to us.
        budget = min(self._free_at_start * fraction - torch.cuda.memory_reserved(self.device), free)
        if budget <= per_token * self.cfg.page_size:
            raise ValueError(f"--mem-fraction-static {fraction} leaves no memory for the KV pool")
        return int(budget // per_token)

    def available_gpu_mem_gb(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        return torch.cuda.mem_get_info(self.device)[0] / (1 << 30)

    def info(self) -> RunnerInfo:
        return RunnerInfo(
            max_total_num_tokens=self.layout.num_pages * self.layout.page_size,
            context_len=self.context_len,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            available_gpu_mem_gb=round(self.available_gpu_mem_gb(), 2),
            attention_backend=self.attn_backend_name,
        )

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, fed: tuple[np.ndarray, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of each request's last fed token: [batch, vocab] (the model's dtype, see ``CausalLM.forward``).
        ``fed``: (token_src, tokens); rows with ``token_src[i] >= 0`` feed
        ``tokens[token_src[i]]``, a token still on the device (see :meth:`launch_ahead`)."""
        return self._run(batch, fed)[0]

    def _run(self, batch: ScheduledBatch, fed: tuple[np.ndarray, torch.Tensor] | None) -> tuple[torch.Tensor, StepInputs | None]:
        """:meth:`forward`'s logits, and the step inputs they came from (None off the fast path)."""
        if self.step_hook is not None:
            self.step_hook(batch)
        if not self._fast:
            fb = build_forward_batch(
                batch.is_decode, batch.chunks, batch.starts, [r.pages for r in batch.reqs], self.cfg.page_size, self.device
            )
            if fed is not None:
                feed_tokens(fb.input_ids, torch.from_numpy(fed[0]).to(self.device), *fed)
            self.attn.prepare(fb)
            return self.model(fb, self.attn, self.pool.buffer), None
        step = self._step_inputs(batch)
        if not batch.is_decode and self.prefill_graphs is not None:
            count = self.prefill_graphs.count_for(step)
            self.uses_cuda_graph = count is not None
            if count is not None:
                return self.prefill_graphs.replay(step, count), step
        padded = self.graphs.padded_size(step.batch_size) if self.graphs and batch.is_decode else None
        self.uses_cuda_graph = padded is not None
        if padded is not None:
            logits = self.graphs.replay(step, padded, fed)
        else:
            fb = self._forward_batch(step, batch, fed)
            self.attn.prepare(fb)
            logits = self.model(fb, self.attn, self.pool.buffer)
        return logits, step

    # ---- overlap schedule: decode steps launched ahead ----------------------------
    @torch.inference_mode()
    def launch_ahead(self, reqs: list, chunks: list[list[int]], starts: list[int], token_src: np.ndarray,
                     tokens: torch.Tensor) -> None:
        """Enqueue a decode step of ``reqs`` feeding ``chunks`` at ``starts``;
        rows with ``token_src[i] >= 0`` feed ``tokens[token_src[i]]`` instead,
        a token sampled on the device that the host has not seen yet. Each
        request's pages must already cover its position."""
        logits, step = self._run(ScheduledBatch(True, reqs, chunks, starts), (token_src, tokens))
        done = _Done()
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        if step is not None:  # a row's token lands in the last page of its page index
            written = step.kv_indices[step.kv_indptr[1:] - 1].tolist()
        else:
            page_size = self.cfg.page_size
            written = [r.pages[start // page_size] for r, start in zip(reqs, starts)]
        self.pool.fence(written, done)
        self._ahead = _Ahead(list(reqs), list(starts), logits, done, self.uses_cuda_graph)

    def take_ahead(self, batch: ScheduledBatch) -> tuple[list[int], torch.Tensor] | None:
        """For a decode batch: (positions in ``batch`` of the requests the ahead
        step computed, their logits), or None. The ahead step is used up."""
        ahead = self._ahead
        if ahead is None or not batch.is_decode:
            return None
        self._ahead = None
        n = len(ahead.reqs)
        if (len(batch.reqs) == n and batch.starts == ahead.starts
                and all(map(operator.is_, batch.reqs, ahead.reqs))):  # the same rows: the common step
            self.uses_cuda_graph = ahead.used_graph
            return list(range(n)), ahead.logits
        row_of = dict(zip(map(id, ahead.reqs), range(n)))
        positions, rows = [], []
        for j, (i, start) in enumerate(zip(map(row_of.get, map(id, batch.reqs)), batch.starts)):
            if i is not None and ahead.starts[i] == start:
                positions.append(j)
                rows.append(i)
        if not rows:
            return None
        self.uses_cuda_graph = ahead.used_graph
        if rows == list(range(n)):
            return positions, ahead.logits
        return positions, ahead.logits.index_select(0, self._index_tensor(rows))

    def drop_ahead(self) -> None:
        """Forget an ahead step nobody will ask for, once it has finished."""
        if self._ahead is not None:
            self._ahead.done.synchronize()
            self._ahead = None

    def _index_tensor(self, rows: list[int]) -> torch.Tensor:
        return to_device(torch.tensor(rows, dtype=torch.long), self.device)

    def _step_inputs(self, batch: ScheduledBatch) -> StepInputs:
        gather = self.page_tables.gather if self.page_tables is not None else None
        return build_step(batch.is_decode, batch.chunks, batch.starts, [r.pages for r in batch.reqs], self.cfg.page_size,
                          gather)

    def _forward_batch(self, step: StepInputs, batch: ScheduledBatch,
                       fed: tuple[np.ndarray, torch.Tensor] | None = None) -> ForwardBatch:
        """Device tensors of the step in one host-to-device copy; the host index
        rides along in ``attn`` for the backend's ``prepare``. ``fed``: see
        :meth:`launch_ahead` (its token_src rides in the same copy)."""
        t, b = step.num_tokens, step.batch_size
        src = np.empty(0, np.int64) if fed is None else fed[0].astype(np.int64)
        host = np.concatenate([step.input_ids, step.positions, step.out_slots, step.logits_indices, src])
        ids, positions, slots, last, src_dev = to_device(torch.from_numpy(host), self.device).split([t, t, t, b, len(src)])
        if fed is not None:
            feed_tokens(ids, src_dev, fed[0], fed[1])
        fb = ForwardBatch(batch.is_decode, ids, positions, slots, step.seq_lens.tolist(),
                          [len(c) for c in batch.chunks], [r.pages for r in batch.reqs], last)
        fb.attn = step
        return fb
