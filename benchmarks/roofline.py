"""The GPU fast path against the machine's own roofline, in one process.

1. The machine: device copy bandwidth (bytes read + written) and the bf16
   8192^3 matmul rate, measured here and now.
2. Per model shape (dummy bf16 weights): decode steps at several batch sizes
   with ``--decode-context`` tokens of context each, and single-prompt
   prefills. Each time is compared with its floor, ``max(bytes / bandwidth,
   FLOPs / matmul rate)``; the fraction printed is floor / measured.
3. KV transfer of one prompt's pages from this process (P) into a second
   process (D) on the same GPU through each of ``--transfer-backends``
   (NIXL's UCX cuda_ipc path, and the cuda_ipc backend's own page copy),
   against a device copy of the same bytes, and as a share of that prompt's
   prefill + transfer.

``--merge-itl BENCH.json --into RESULT.json`` adds a ``pdserve bench`` ITL
median (batch 1, through HTTP) to a result, as a ratio to the decode step.

    python -m pdserve.benchmarks.roofline --output-json benchmarks/results/roofline-h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from pdserve.common.args import add_dataclass_args, config_from_args, flag
from pdserve.transfer.base import TRANSFER_BACKENDS, TransferConfig

DECODE_BATCHES = (1, 8, 64, 256)
PREFILL_LENGTHS = (512, 2048, 8192)
MODELS = ("llama-3.2-1b", "qwen3-0.6b")
_CONFIGS = Path(__file__).resolve().parent / "configs"
_GIB = 1 << 30


@dataclass(frozen=True)
class RooflineConfig:
    models: tuple[str, ...] = field(default=MODELS, metadata=flag("benchmark config names", nargs="+"))
    decode_batches: tuple[int, ...] = field(default=DECODE_BATCHES, metadata=flag(
        "decode batch sizes to time", nargs="+"))
    decode_context: int = field(default=1024, metadata=flag("context tokens of every sequence in a decode step"))
    decode_steps: int = field(default=64, metadata=flag("decode steps timed per batch size"))
    prefill_lengths: tuple[int, ...] = field(default=PREFILL_LENGTHS, metadata=flag(
        "prompt lengths of the single-prompt prefills", nargs="+"))
    transfer_tokens: int = field(default=2048, metadata=flag("prompt tokens whose KV pages are transferred"))
    transfer_repeats: int = field(default=20, metadata=flag("timed transfers per backend"))
    transfer_backends: tuple[str, ...] = field(default=("nixl", "cuda_ipc"), metadata=flag(
        "KV transfer backends to time, P to D on this GPU", nargs="+"))
    progress_delay_us: int = field(default=TransferConfig.progress_delay_us, metadata=flag(
        "nixl progress-thread sleep on both sides"))
    attention_backend: str | None = field(default=None, metadata=flag(
        "attention backend of the models (default: the one pdserve serve picks)"))
    page_size: int = field(default=16, metadata=flag("tokens per KV page"))
    skip_transfer: bool = field(default=False, metadata=flag("leave out the KV transfer"))
    gemv_sweep: bool = field(default=False, metadata=flag("also tune the single-token product kernels"))
    compare_pdl: bool = field(default=False, metadata=flag("also time decode at batch 1 without PDL"))
    kernel_profile: bool = field(default=False, metadata=flag(
        "also split each decode batch's and one-prompt prefill's GPU time by kernel (torch profiler over eager steps)"))
    output_json: str | None = field(default=None, metadata=flag(
        "result file (default: benchmarks/results/roofline-DATE.json)"))


@dataclass(frozen=True)
class MergeConfig:
    """Instead of a run: add one measurement to an existing result file (``--into``) and exit."""

    merge_itl: str | None = field(default=None, metadata=flag(
        "add a pdserve bench ITL (its result JSON) to --into and exit", metavar="BENCH_JSON"))
    http_itl: str | None = field(default=None, metadata=flag(
        "measure the batch-1 ITL of a server, add it to --into, exit", metavar="URL"))
    http_ttft: str | None = field(default=None, metadata=flag(
        "measure the TTFT of 512-token prompts one at a time through a server, add it to --into as a ratio "
        "to the prefill floor of the first of --models, exit", metavar="URL"))
    into: str | None = field(default=None, metadata=flag(
        "the result file --merge-itl, --http-itl and --http-ttft update", metavar="RESULT_JSON"))


@dataclass(frozen=True)
class Machine:
    gpu: str
    copy_bytes_per_s: float  # bytes read + written
    matmul_flops_per_s: float

    def floor_s(self, num_bytes: float, flops: float) -> float:
        return max(num_bytes / self.copy_bytes_per_s, flops / self.matmul_flops_per_s)


def _bench_ms(fn, rep_ms: int = 200) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _copy_s() -> float:
    import torch

    src = torch.randn(_GIB // 2, dtype=torch.float16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    return _bench_ms(lambda: dst.copy_(src)) / 1e3


def _matmul_s(n: int) -> float:
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return _bench_ms(lambda: a @ b) / 1e3


def measure_machine() -> Machine:
    import torch

    copy_s, mm_s = _copy_s(), _matmul_s(8192)
    torch.cuda.empty_cache()
    return Machine(torch.cuda.get_device_name(), 2 * _GIB / copy_s, 2 * 8192**3 / mm_s)


# ---- model costs ----------------------------------------------------------------
@dataclass(frozen=True)
class ModelCost:
    linear_params: int  # all layers' projections
    lm_params: int
    kv_bytes_per_token: int
    hidden: int
    vocab: int
    attn_width: int  # num_heads * head_dim * num_layers

    @classmethod
    def of(cls, m) -> ModelCost:
        q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        per_layer = m.hidden_size * (q + 2 * kv) + q * m.hidden_size + 3 * m.hidden_size * m.intermediate_size
        return cls(m.num_layers * per_layer, m.vocab_size * m.hidden_size, m.num_layers * 2 * kv * 2,
                   m.hidden_size, m.vocab_size, q * m.num_layers)

    @classmethod
    def of_name(cls, name: str) -> ModelCost:
        from pdserve.model.config import ModelConfig

        return cls.of(ModelConfig.from_dict(json.loads((_CONFIGS / f"{name}.json").read_text())))

    def decode(self, batch: int, context: int) -> tuple[float, float]:
        """(bytes, FLOPs) of one decode step: weights once, every sequence's KV."""
        weights = 2 * (self.linear_params + self.lm_params)
        num_bytes = weights + batch * (context + 1) * self.kv_bytes_per_token + batch * self.vocab * 4
        flops = 2 * batch * (self.linear_params + self.lm_params) + 4 * batch * context * self.attn_width
        return num_bytes, flops

    def prefill(self, tokens: int, num_seqs: int = 1, prefix: int = 0) -> tuple[float, float]:
        """``tokens`` new tokens split evenly over ``num_seqs`` sequences, each
        after ``prefix`` cached tokens (whose KV is read)."""
        per_seq = tokens // num_seqs
        num_bytes = (2 * (self.linear_params + self.lm_params) + tokens * self.kv_bytes_per_token
                     + num_seqs * prefix * self.kv_bytes_per_token)
        # causal attention, QK^T and PV: each new token sees the prefix and half its own chunk on average
        attention = 4 * num_seqs * per_seq * (prefix + per_seq / 2) * self.attn_width
        flops = 2 * tokens * self.linear_params + 2 * num_seqs * self.lm_params + attention
        return num_bytes, flops


# ---- model timings ------------------------------------------------------------------
def _runner(cfg: RooflineConfig, name: str, pool_tokens: int, disable_pdl: bool = False):
    from pdserve.common.config import ServerConfig
    from pdserve.model.builtin import config_dir_for
    from pdserve.model.config import ModelConfig
    from pdserve.model.runner import ModelRunner

    model_dir = config_dir_for(_CONFIGS / f"{name}.json")
    server = ServerConfig(model_path=model_dir, load_format="dummy", dtype="bfloat16", page_size=cfg.page_size,
                          max_total_tokens=pool_tokens, attention_backend=cfg.attention_backend,
                          cuda_graph_max_bs=max(cfg.decode_batches), max_running_requests=max(cfg.decode_batches),
                          disable_pdl=disable_pdl)
    runner = ModelRunner(server, model_dir, ModelConfig.from_dir(model_dir))
    runner.pool.buffer.normal_()  # time attention on data, not zeros
    return runner


def _reqs(runner, batch: int, context: int, extra: int, seed: int):
    import random

    from pdserve.common.sampling_params import SamplingParams
    from pdserve.engine.request import Req

    rng = random.Random(seed)
    vocab = runner.model_cfg.vocab_size
    reqs = []
    for i in range(batch):
        req = Req(f"r{i}", [rng.randrange(vocab) for _ in range(context)], SamplingParams(temperature=0))
        req.pages = runner.pool.alloc(-(-(context + extra) // runner.cfg.page_size))
        req.num_computed = context
        reqs.append(req)
    return reqs


class _PhaseTimer:
    """Wall time spent in chosen methods, by wrapping them for the duration."""

    def __init__(self) -> None:
        self.totals_s: dict[str, float] = {}
        self._restore: list = []

    def wrap(self, owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals_s[label] = self.totals_s.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, attr, timed)
        self._restore.append((owner, attr, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)


def time_decode(runner, batch: int, context: int, steps: int) -> dict:
    """The engine's decode loop (forward or the step launched ahead, sampling,
    the next step launched ahead, host sync), its host-side phases, and the
    graph replay alone."""
    import numpy as np
    import torch
    from pdserve.engine.sampler import Sampler
    from pdserve.model.batch import ScheduledBatch

    reqs = _reqs(runner, batch, context - 1, steps + 8, seed=batch)
    for r in reqs:
        r.output_ids.append(1)
    sampler = Sampler(0, runner.device)
    timer = _PhaseTimer()
    every_row = np.arange(batch, dtype=np.int64)

    def step() -> None:
        b = ScheduledBatch(True, reqs, [[r.output_ids[-1]] for r in reqs], [r.seq_len - 1 for r in reqs])
        taken = runner.take_ahead(b)
        logits = taken[1] if taken is not None else timer_call("forward (host)", runner.forward, b)
        pending = sampler.sample_async(logits, [r.params for r in reqs], [(r.prompt_ids, r.output_ids) for r in reqs])
        if runner.lookahead:
            timer_call("launch ahead (host)", runner.launch_ahead, reqs, [[0]] * batch, [r.seq_len for r in reqs],
                       every_row, pending.token_ids)
        for r, t in zip(reqs, timer_call("wait for tokens", pending.wait).token_ids):
            r.output_ids.append(t)

    def timer_call(label, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        timer.totals_s[label] = timer.totals_s.get(label, 0.0) + time.perf_counter() - start
        return out

    for _ in range(4):
        step()
    timer.totals_s.clear()
    timer.wrap(runner, "_step_inputs", "step inputs")
    if runner.graphs is not None:
        timer.wrap(runner.graphs.inputs, "load", "graph inputs copy")
        timer.wrap(runner.attn, "graph_metadata", "attention metadata")
        graph = runner.graphs._graphs.get(runner.graphs.padded_size(batch))
        if graph is not None:
            timer.wrap(graph, "replay", "graph launch")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    loop_s = (time.perf_counter() - start) / steps
    timer.restore()
    runner.drop_ahead()
    graph = runner.graphs._graphs.get(runner.graphs.padded_size(batch)) if runner.graphs else None
    replay_s = _bench_ms(graph.replay) / 1e3 if graph is not None else None
    used_graph = runner.uses_cuda_graph
    runner.pool.reclaim()
    for r in reqs:
        runner.pool.release(r.pages)
    host_us = {k: round(v / steps * 1e6, 1) for k, v in timer.totals_s.items()}
    return {"step_s": loop_s, "graph_replay_s": replay_s, "cuda_graph": used_graph, "overlap": runner.lookahead,
            "host_us": host_us}


def time_prefill(runner, tokens: int, num_seqs: int = 1, prefix: int = 0, graphs: bool = True,
                 repeats: int = 10) -> dict:
    """Per forward of ``tokens`` new tokens over ``num_seqs`` prompts, each
    after ``prefix`` cached tokens, medians of: wall time to the result (what
    an engine waits), host time to launch it, and the GPU's span from first
    to last kernel. ``graphs=False`` runs it without prefill CUDA graphs."""
    import torch
    from pdserve.model.batch import ScheduledBatch

    reqs = _reqs(runner, num_seqs, prefix + tokens // num_seqs, 1, seed=tokens + prefix + num_seqs)
    batch = ScheduledBatch(False, reqs, [r.prompt_ids[prefix:] for r in reqs], [prefix] * num_seqs)
    saved = runner.prefill_graphs
    if not graphs:
        runner.prefill_graphs = None
    runner.forward(batch)
    used_graph = runner.uses_cuda_graph
    timer = _prefill_phase_timer(runner, used_graph)
    walls, launches, spans = [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start = time.perf_counter()
        begin.record()
        runner.forward(batch)
        launches.append(time.perf_counter() - start)
        end.record()
        end.synchronize()
        walls.append(time.perf_counter() - start)
        spans.append(begin.elapsed_time(end) / 1e3)
    timer.restore()
    runner.prefill_graphs = saved
    for req in reqs:
        runner.pool.release(req.pages)
    launch_s, span_s = statistics.median(launches), statistics.median(spans)
    host_us = {k: round(v / repeats * 1e6, 1) for k, v in timer.totals_s.items()}
    return {"num_seqs": num_seqs, "prefix": prefix, "cuda_graph": used_graph, "step_s": statistics.median(walls),
            "host_launch_s": launch_s, "gpu_span_s": span_s, "host_share": launch_s / span_s, "host_us": host_us}


def _prefill_phase_timer(runner, graphs: bool) -> _PhaseTimer:
    """Where a prefill's host launch goes: the step's inputs, and with a
    prefill graph its fixed buffers' fill and copy and the replay itself."""
    timer = _PhaseTimer()
    timer.wrap(runner, "_step_inputs", "step inputs")
    if graphs:
        timer.wrap(runner.prefill_graphs.inputs, "load", "graph inputs copy")
        for graph in runner.prefill_graphs._graphs.values():
            timer.wrap(graph, "replay", "graph launch")
    return timer


def decode_kernels(runner, batch: int, context: int, steps: int = 5, top: int = 16) -> list[dict]:
    """GPU time of eager decode steps (the same kernels the graph replays), by
    kernel name, largest first: where a decode step's time goes."""
    from pdserve.model.batch import ScheduledBatch

    reqs = _reqs(runner, batch, context - 1, 2, seed=batch)
    split = _kernel_split(runner, ScheduledBatch(True, reqs, [[1]] * batch, [r.seq_len for r in reqs]), steps, top)
    for r in reqs:
        runner.pool.release(r.pages)
    return split


def prefill_kernels(runner, tokens: int, steps: int = 3, top: int = 16) -> list[dict]:
    """The same split for eager forwards of one ``tokens``-long prompt."""
    from pdserve.model.batch import ScheduledBatch

    reqs = _reqs(runner, 1, tokens, 1, seed=tokens)
    split = _kernel_split(runner, ScheduledBatch(False, reqs, [r.prompt_ids for r in reqs], [0]), steps, top)
    for r in reqs:
        runner.pool.release(r.pages)
    return split


def _kernel_split(runner, batch, steps: int, top: int) -> list[dict]:
    """Per-step GPU time by kernel name over ``steps`` eager forwards of ``batch``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graphs, prefill_graphs = runner.graphs, runner.prefill_graphs
    runner.graphs = runner.prefill_graphs = None
    runner.forward(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.forward(batch)
        torch.cuda.synchronize()
    runner.graphs, runner.prefill_graphs = graphs, prefill_graphs
    totals_us: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        if us > 0:
            totals_us[evt.key] = totals_us.get(evt.key, 0.0) + us
    whole_us = sum(totals_us.values()) or 1.0
    ranked = sorted(totals_us.items(), key=lambda kv: -kv[1])[:top]
    return [{"name": k, "us_per_step": round(v / steps, 1), "share": round(v / whole_us, 3)} for k, v in ranked]


# Prefill rows per length: one prompt (graphs as served), the same without
# graphs (for the ratio), four prompts in one step, one chunk over a cached prefix.
PREFILL_VARIANTS = (("prefill", {}), ("prefill_eager", {"graphs": False}), ("prefill_batch", {"num_seqs": 4}),
                    ("prefill_extend", {"prefix": None}))


def _pool_tokens(cfg: RooflineConfig) -> int:
    # the largest prefill variant is a chunk over a cached prefix as long as itself
    return (max(cfg.decode_batches) * (cfg.decode_context + cfg.decode_steps + 32)
            + 2 * max(cfg.prefill_lengths, default=0) + 64)


def _release_gpu_memory() -> None:
    """After the caller dropped its runner: the next model gets the memory."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def bench_model(cfg: RooflineConfig, name: str, machine: Machine) -> dict:
    runner = _runner(cfg, name, _pool_tokens(cfg))
    cost = ModelCost.of(runner.model_cfg)
    rows = []
    for batch in cfg.decode_batches:
        timing = time_decode(runner, batch, cfg.decode_context, cfg.decode_steps)
        floor = machine.floor_s(*cost.decode(batch, cfg.decode_context + cfg.decode_steps // 2))
        rows.append({"kind": "decode", "batch": batch, "context": cfg.decode_context, **timing, "floor_s": floor,
                     "fraction": floor / timing["step_s"],
                     "fraction_graph": floor / timing["graph_replay_s"] if timing["graph_replay_s"] else None})
        if runner.lookahead:  # the same loop without the overlap schedule, for the ratio
            runner.lookahead = False
            serial = time_decode(runner, batch, cfg.decode_context, cfg.decode_steps)
            runner.lookahead = True
            rows[-1].update(step_s_serial=serial["step_s"], host_us_serial=serial["host_us"],
                            fraction_serial=floor / serial["step_s"])
        _print_row(name, rows[-1])
    for tokens in cfg.prefill_lengths:
        for kind, variant in PREFILL_VARIANTS:
            if "prefix" in variant:  # a chunk as long as the cached prefix it extends
                variant = {"prefix": tokens}
            timing = time_prefill(runner, tokens, **variant)
            num_bytes, flops = cost.prefill(tokens, timing["num_seqs"], timing["prefix"])
            floor = machine.floor_s(num_bytes, flops)
            rows.append({"kind": kind, "tokens": tokens, **timing, "floor_s": floor,
                         "fraction": floor / timing["step_s"], "tflops": flops / timing["step_s"] / 1e12})
            _print_row(name, rows[-1])
    info = {"model": name, "attention_backend": runner.attn_backend_name, "rows": rows}
    del runner
    _release_gpu_memory()
    return info


def profile_model(cfg: RooflineConfig, info: dict) -> None:
    """Add each decode batch's and one-prompt prefill's split of GPU time by
    kernel to ``info``'s rows, in a runner of its own. Run after every
    timing: once the profiler has run in a process its hooks stay, and a
    launch then costs the host about twice as long (an eager 1B prefill of
    512 tokens launched in 11.4 ms after a profile, 5.9 ms in a process
    without one, on the same kind of H100), which would inflate every host
    time measured after it."""
    name = info["model"]
    runner = _runner(cfg, name, _pool_tokens(cfg))
    for row in info["rows"]:
        if row["kind"] == "decode":
            what, row["kernels"] = f"decode bs={row['batch']}", decode_kernels(runner, row["batch"], cfg.decode_context)
        elif row["kind"] == "prefill":
            what, row["kernels"] = f"prefill {row['tokens']}", prefill_kernels(runner, row["tokens"])
        else:
            continue
        print(f"{name:<14}{what} kernels (share of GPU time): "
              + ", ".join(f"{k['name'][:48]} {k['share']:.2f}" for k in row["kernels"][:8]), flush=True)
    del runner
    _release_gpu_memory()


def decode_without_pdl(cfg: RooflineConfig, name: str, machine: Machine) -> dict:
    """Decode at batch 1 with programmatic dependent launch off (``--disable-pdl``)."""
    from dataclasses import replace

    small = replace(cfg, decode_batches=(1,), prefill_lengths=())
    runner = _runner(small, name, cfg.decode_context + cfg.decode_steps + 64, disable_pdl=True)
    timing = time_decode(runner, 1, cfg.decode_context, cfg.decode_steps)
    del runner
    _release_gpu_memory()
    floor = machine.floor_s(*ModelCost.of_name(name).decode(1, cfg.decode_context + cfg.decode_steps // 2))
    row = {"kind": "decode", "batch": 1, "pdl": False, **timing, "floor_s": floor, "fraction": floor / timing["step_s"]}
    _print_row(f"{name} no PDL", row)
    return row


def _print_row(model: str, row: dict) -> None:
    what = f"decode bs={row['batch']}" if row["kind"] == "decode" else f"{row['kind']} {row['tokens']}"
    extra = f" graph {row['graph_replay_s'] * 1e3:8.3f} ms" if row.get("graph_replay_s") else ""
    if row.get("host_us"):
        extra += f" host us {row['host_us']}"
    if row.get("step_s_serial"):
        extra += f"; without overlap {row['step_s_serial'] * 1e3:.3f} ms (fraction {row['fraction_serial']:.2f})"
    if row.get("host_launch_s"):
        extra += (f" host launch {row['host_launch_s'] * 1e3:.3f} ms, gpu span {row['gpu_span_s'] * 1e3:.3f} ms"
                  f" (host/gpu {row['host_share']:.2f}, graph {row['cuda_graph']})")
    print(f"{model:<14}{what:<22}{row['step_s'] * 1e3:9.3f} ms  floor {row['floor_s'] * 1e3:8.3f} ms  "
          f"fraction {row['fraction']:.2f}{extra}", flush=True)


# ---- KV transfer, P (here) -> D (child process) -------------------------------------
def _transfer_config(cfg_dict: dict, backend: str, name: str):
    from pdserve.transfer.base import TransferConfig

    return TransferConfig(backend=backend, instance_name=name, progress_delay_us=cfg_dict["progress_delay_us"])


def _decode_side(conn, layout_dict: dict, cfg_dict: dict, backend: str) -> None:
    import torch
    from pdserve.common.kv_layout import KVLayout
    from pdserve.transfer.base import KVMemory, create_transfer_agent

    layout = KVLayout.from_dict(layout_dict)
    buf = torch.zeros(layout.total_bytes // layout.itemsize, dtype=getattr(torch, layout.dtype), device="cuda")
    agent = create_transfer_agent(_transfer_config(cfg_dict, backend, "roofline-D"), KVMemory.from_tensor(buf, layout))
    conn.send(agent.peer_info())
    peer = agent.add_peer(conn.recv())
    while True:
        msg = conn.recv()
        if msg[0] == "exit":
            agent.close()
            return
        if msg[0] == "checksum":
            conn.send(float(buf.view(layout.num_regions, layout.num_pages, -1)[:, : msg[1]].double().sum()))
            continue
        receiver = agent.create_receiver(msg[1], peer)
        conn.send("ready")
        polls, start = 0, time.monotonic()
        while not (state := receiver.poll()).is_terminal:
            polls += 1
        done = time.monotonic()
        conn.send((int(state), done, (done - start) / max(polls, 1)))


_FORWARD_TAIL_CYCLES = 20_000_000  # ~10 ms of GPU time standing in for the prefill forward


def bench_transfer(cfg: RooflineConfig, machine: Machine, model: str, backend: str) -> dict:
    """One prompt's pages P (this process) -> D (a child process on this GPU).

    Cold, with an idle GPU: ``step_s`` from posting to D seeing the room done
    (the data and its notice), ``sender_done_s`` to P seeing its copy/WRITE
    complete (the bytes in D's pool), ``post_s`` the host time of ``send()``.

    As the engine posts: the chunk is posted right after the forward that
    writes it is launched (here a GPU sleep stands in for that forward), and
    ``exposed_s`` runs from the moment the forward's last kernel completed
    (P spinning on its event) to D seeing the room done: the time a decode
    instance waits on the transfer beyond the prefill itself."""
    import torch
    from pdserve.common.kv_layout import KVLayout
    from pdserve.model.config import ModelConfig
    from pdserve.transfer.base import KVMemory, create_transfer_agent

    m = ModelConfig.from_dict(json.loads((_CONFIGS / f"{model}.json").read_text()))
    num_pages = -(-cfg.transfer_tokens // cfg.page_size)
    layout = KVLayout(num_layers=m.num_layers, num_pages=num_pages, page_size=cfg.page_size,
                      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, dtype="bfloat16")
    buf = torch.randn(layout.total_bytes // 2, dtype=torch.bfloat16, device="cuda")
    cfg_dict = asdict(cfg)
    agent = create_transfer_agent(_transfer_config(cfg_dict, backend, "roofline-P"), KVMemory.from_tensor(buf, layout))
    conn, child_conn = mp.get_context("spawn").Pipe()
    child = mp.get_context("spawn").Process(target=_decode_side, args=(child_conn, layout.to_dict(), cfg_dict, backend),
                                            daemon=True)
    child.start()
    try:
        peer = agent.add_peer(conn.recv())
        conn.send(agent.peer_info())
        pages = list(range(num_pages))
        timer = _posting_timer(backend)
        times, sender_times, post_times, exposed_times, poll_times = [], [], [], [], []
        exposed_landed = []  # behind a forward: until P saw its copy/WRITE complete
        for i in range(cfg.transfer_repeats + 3):
            start, posted, sent, done, _ = _one_transfer(agent, conn, peer, pages, behind_forward=False)
            if i == 2:
                timer.totals_s.clear()
            if i >= 3:  # the first transfers map the peer's memory
                times.append(done - start)
                sender_times.append(sent - start)
                post_times.append(posted - start)
        for _ in range(cfg.transfer_repeats):
            ready, _, sent, done, poll_s = _one_transfer(agent, conn, peer, pages, behind_forward=True)
            exposed_times.append(done - ready)
            exposed_landed.append(sent - ready)
            poll_times.append(poll_s)
        conn.send(("checksum", num_pages))
        if not math.isclose(conn.recv(), float(buf.double().sum()), rel_tol=1e-9, abs_tol=1e-3):
            raise RuntimeError("decode side's pages differ from the prefill side's")
        conn.send(("exit",))
    finally:
        timer.restore()
        child.join(30)
        if child.is_alive():
            child.kill()
        agent.close()
    seconds = statistics.median(times)
    floor = 2 * layout.total_bytes / machine.copy_bytes_per_s
    landed = statistics.median(sender_times)
    row = {"kind": "transfer", "backend": backend, "model": model, "tokens": cfg.transfer_tokens,
           "bytes": layout.total_bytes, "regions": layout.num_regions, "step_s": seconds, "sender_done_s": landed,
           "post_s": statistics.median(post_times), "floor_s": floor, "fraction": floor / seconds,
           "fraction_landed": floor / landed, "times_s": times,
           "exposed_s": statistics.median(exposed_times), "fraction_exposed": floor / statistics.median(exposed_times),
           "exposed_times_s": exposed_times, "exposed_landed_s": statistics.median(exposed_landed),
           "decode_poll_us": statistics.median(poll_times) * 1e6,
           "posting_us": {k: round(v / len(times) * 1e6, 1) for k, v in timer.totals_s.items()}}
    if backend == "cuda_ipc":
        row["kernel_s"] = _page_copy_s(buf, layout, num_pages)
        row["fraction_kernel"] = floor / row["kernel_s"]
    return row


def _one_transfer(agent, conn, peer: str, pages: list[int], behind_forward: bool) -> tuple[float, float, float, float, float]:
    """(start, posted, landed on P, done on D) in host monotonic seconds, and
    the decode side's mean time per receiver poll; with ``behind_forward`` the
    start is when the stand-in forward completed."""
    import random

    import torch
    from pdserve.transfer.base import RoomState

    room = random.getrandbits(63)
    conn.send(("room", room))
    conn.recv()
    sender = agent.create_sender(room, peer, pages)
    forward_done = None
    if behind_forward:
        torch.cuda._sleep(_FORWARD_TAIL_CYCLES)
        forward_done = torch.cuda.Event()
        forward_done.record()
    start = time.monotonic()
    sender.send(pages, 0, True)
    posted = time.monotonic()
    if forward_done is not None:
        while not forward_done.query():
            pass
        start = time.monotonic()
    while not sender.poll().is_terminal:
        pass
    sent = time.monotonic()
    state, done, poll_s = conn.recv()
    if state != RoomState.SUCCESS:
        raise RuntimeError(f"transfer room ended {RoomState(state).name}")
    return start, posted, sent, done, poll_s


def _posting_timer(backend: str) -> _PhaseTimer:
    """Where a sender's ``send()`` spends its host time, per transfer."""
    from pdserve.transfer import descriptors, nixl_backend

    timer = _PhaseTimer()
    if backend == "cuda_ipc":
        from pdserve.transfer import cuda_ipc_backend as ipc

        timer.wrap(ipc, "page_runs", "page runs")
        timer.wrap(ipc.CudaIpcAgent, "copy", "copy launch")
        timer.wrap(ipc.CudaIpcAgent, "mapped", "peer lookup")
    elif backend == "nixl":
        timer.wrap(nixl_backend, "build_descriptors", "descriptors")
        timer.wrap(nixl_backend.NixlAgent, "write", "nixl write (prep + post)")
        timer.wrap(descriptors, "page_runs", "page runs")
    return timer


def _page_copy_s(buf, layout, num_pages: int) -> float:
    """The cuda_ipc backend's page-copy kernel alone, between two local pools."""
    import torch
    from pdserve.transfer.kernels.page_copy import copy_pages

    src = buf.view(torch.int64)
    dst = torch.empty_like(src)
    pages = torch.arange(num_pages, dtype=torch.int32, device="cuda")
    region, page = layout.region_bytes // 8, layout.page_bytes // 8
    return _bench_ms(lambda: copy_pages(src, dst, pages, pages, layout.num_regions, region, region, page)) / 1e3


# ---- GEMV tuning ------------------------------------------------------------------------
def gemv_sweep(models: tuple[str, ...], chain: int = 20) -> list[dict]:
    """Time each single-token product of the models' shapes under every
    candidate tiling, the way the decode graph runs them: ``chain`` launches
    captured in one CUDA graph with PDL, each on its own weight (together far
    larger than L2, as the model's layers are)."""
    import torch
    from pdserve.model.config import ModelConfig
    from pdserve.model.kernels.gemv import gemv, gemv_config, sweep_candidates

    results = []
    for name in models:
        m = ModelConfig.from_dict(json.loads((_CONFIGS / f"{name}.json").read_text()))
        q, kv, h, i = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.hidden_size, m.intermediate_size
        for label, n, k, flags in [("qkv", q + 2 * kv, h, {"norm": True}), ("o", h, q, {"residual": True}),
                                   ("gate_up", i, h, {"norm": True, "gated": True}), ("down", h, i, {"residual": True}),
                                   ("lm", m.vocab_size, h, {"norm": True, "out_float": True})]:
            gated = flags.get("gated", False)
            weights = [torch.randn((2 * n if gated else n, k), dtype=torch.bfloat16, device="cuda") / k**0.5
                       for _ in range(chain)]
            x = torch.randn((1, k), dtype=torch.bfloat16, device="cuda")
            norm = torch.ones(k, dtype=torch.bfloat16, device="cuda") if flags.get("norm") else None
            residual = torch.randn((1, n), dtype=torch.bfloat16, device="cuda") if flags.get("residual") else None
            timed = []
            for c in sweep_candidates(k):
                launch = partial(gemv, x, norm_weight=norm, residual=residual, gated=gated,
                                 out_float=flags.get("out_float", False), config=c, pdl=True)
                timed.append((_chained_graph_s(launch, weights) / chain, c))
            timed.sort(key=lambda t: t[0])
            best_s, best = timed[0]
            current = gemv_config(n, k, gated)
            current_s = next((s for s, c in timed if c == current), None)
            nbytes = weights[0].numel() * 2
            results.append({"model": name, "op": label, "n": n, "k": k, "gated": gated, "us": best_s * 1e6,
                            "config": asdict(best), "gb_per_s": nbytes / best_s / 1e9,
                            "current_config": asdict(current), "current_us": None if current_s is None else current_s * 1e6})
            print(f"gemv {name:<14}{label:<8} {best_s * 1e6:7.2f} us {nbytes / best_s / 1e9:6.0f} GB/s  "
                  f"({n}, {k}, {gated}): GemvConfig({best.block_n}, {best.block_k}, {best.num_warps}, {best.acc_2d}); "
                  f"in use: {current} {'' if current_s is None else f'{current_s * 1e6:.2f} us'}", flush=True)
            del weights
            torch.cuda.empty_cache()
    return results


def _chained_graph_s(launch, weights: list) -> float:
    """Best of five timings of one replay of a graph that calls ``launch(w)`` for each weight."""
    import torch

    launch(weights[0])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            launch(w)
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        begin.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, begin.elapsed_time(end) / 1e3 / 10)
    return best


# ---- targets, report, entry point ---------------------------------------------------------
def _row(results: dict, model: str, kind: str, key: str, value: int) -> dict | None:
    for entry in results["models"]:
        if entry["model"] == model:
            return next((r for r in entry["rows"] if r["kind"] == kind and r.get(key) == value), None)
    return None


def check_targets(results: dict) -> list[dict]:
    """The issue's targets, as (name, value, limit, met) rows."""
    out = []

    def add(name: str, value: float | None, limit: float, at_least: bool = True) -> None:
        if value is not None:
            out.append({"target": name, "value": round(value, 4), "limit": limit,
                        "met": value >= limit if at_least else value <= limit})

    lead = results["models"][0]["model"] if results["models"] else None
    if lead:
        bs1, bs256, pf = (_row(results, lead, "decode", "batch", 1), _row(results, lead, "decode", "batch", 256),
                          _row(results, lead, "prefill", "tokens", 2048))
        add(f"{lead} decode bs=1 fraction", bs1 and bs1["fraction"], 0.75)
        add(f"{lead} decode bs=256 fraction", bs256 and bs256["fraction"], 0.60)
        add(f"{lead} prefill 2048 fraction", pf and pf["fraction"], 0.60)
    for entry in results["models"]:
        _host_path_targets(entry, add)
    transfer = results.get("transfer")
    if transfer:
        via = f" ({transfer.get('backend', 'nixl')})"
        # As the engine posts (behind the forward that writes the pages); older
        # result files have only the cold figure.
        add("transfer 2048 fraction of copy" + via, transfer.get("fraction_exposed", transfer["fraction"]), 0.50)
        add("transfer share of TTFT" + via, transfer.get("ttft_share"), 0.03, at_least=False)
    http = results.get("http")
    if http:
        add("HTTP ITL median / decode step", http["ratio"], 1.3, at_least=False)
    ttft = results.get("http_ttft")
    if ttft:
        add(f"HTTP TTFT {ttft['tokens']} tokens / prefill floor", ttft["ratio"], 1.3, at_least=False)
    return out


# The host path's targets per model shape: (kind, key, value) -> least fraction.
HOST_PATH_TARGETS = {
    "llama-3.1-8b": {("prefill", "tokens", 512): 0.8, ("decode", "batch", 128): 0.8, ("decode", "batch", 256): 0.8},
    "llama-3.2-1b": {("prefill", "tokens", 512): 0.5, ("prefill", "tokens", 2048): 0.75,
                     ("decode", "batch", 1): 0.75, ("decode", "batch", 128): 0.8, ("decode", "batch", 256): 0.8},
}
MAX_HOST_SHARE = 0.3  # host launch time / GPU span of a prefill of 512 tokens or more


def _host_path_targets(entry: dict, add) -> None:
    model = entry["model"]
    for (kind, key, value), least in HOST_PATH_TARGETS.get(model, {}).items():
        row = next((r for r in entry["rows"] if r["kind"] == kind and r.get(key) == value), None)
        add(f"{model} {kind} {key}={value} fraction", row and row["fraction"], least)
    for row in entry["rows"]:
        if row["kind"] in ("prefill", "prefill_batch", "prefill_extend") and row["tokens"] >= 512:
            add(f"{model} {row['kind']} {row['tokens']} host launch / GPU span", row.get("host_share"),
                MAX_HOST_SHARE, at_least=False)


def http_itl_ms(base_url: str, num_prompts: int = 8, input_len: int = 1024, output_len: int = 128) -> float:
    """Median inter-token latency of streamed ``/generate`` requests, one at a
    time (batch 1), measured with httpx: the gap between chunks divided over
    the tokens each chunk adds."""
    import random

    import httpx

    rng = random.Random(0)
    gaps = []
    with httpx.Client(timeout=120, trust_env=False) as http:
        for i in range(num_prompts + 1):  # the first request warms up
            body = {"input_ids": [rng.randrange(4, 1000) for _ in range(input_len)], "stream": True,
                    "sampling_params": {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}}
            last_t, last_n, mine = None, 0, []
            with http.stream("POST", f"{base_url}/generate", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now, n = time.perf_counter(), len(json.loads(line[6:])["output_ids"])
                    if last_t is not None and n > last_n:
                        mine += [(now - last_t) / (n - last_n)] * (n - last_n)
                    last_t, last_n = now, n
            if mine and i > 0:
                gaps += mine
    return statistics.median(gaps) * 1e3


TTFT_CLIENTS = ("http.client", "httpx")


def http_ttft_ms(base_url: str, num_prompts: int = 8, input_len: int = 512,
                 client: str = "http.client", seed: int = 1) -> tuple[float, dict[str, float]]:
    """Median time to the first streamed token of ``/generate`` requests with
    distinct random prompts of ``input_len`` ids (no prefix-cache hit), one
    at a time, measured from the request's start; and the median of each
    phase of their journey (``return_timing``: front, queue, prefill, ...) in
    ms, which says where the time beyond the prefill went. ``client``: the
    standard library's ``http.client`` by default, whose own cost per request
    is lower than ``httpx``'s (13.8 against 14.4 ms on one 8B server on an
    H100 host); ``--http-ttft`` records the two. Runs with different
    ``seed`` send different prompts, so a second run hits no cached prefix."""
    import random

    rng = random.Random(seed)
    post = _stdlib_stream if client == "http.client" else _httpx_stream
    ttfts, journeys = [], []
    with post(base_url) as stream:
        for i in range(num_prompts + 1):  # the first request warms up
            body = {"input_ids": [rng.randrange(4, 1000) for _ in range(input_len)], "stream": True,
                    "return_timing": True,
                    "sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}}
            start = time.perf_counter()
            ttft_s, phases = None, None
            for line in stream(json.dumps(body).encode()):  # to the end: the next request finds the server idle
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if ttft_s is None and chunk["output_ids"]:
                    ttft_s = time.perf_counter() - start
                phases = chunk["meta_info"].get("timing", {}).get("phases_s", phases)
            if i > 0:
                ttfts.append(ttft_s)
                journeys.append(phases or {})
    names = sorted({name for j in journeys for name in j})
    phases_ms = {n: statistics.median(j.get(n, 0.0) for j in journeys) * 1e3 for n in names}
    return statistics.median(ttfts) * 1e3, phases_ms


@contextlib.contextmanager
def _stdlib_stream(base_url: str):
    """``stream(body)``: the lines of one streamed ``/generate`` answer, over one kept-alive connection."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)

    def stream(body: bytes):
        conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"/generate answered {resp.status}: {resp.read()[:200]!r}")
        yield from iter(resp.readline, b"")

    try:
        yield stream
    finally:
        conn.close()


@contextlib.contextmanager
def _httpx_stream(base_url: str):
    import httpx

    with httpx.Client(timeout=120, trust_env=False) as http:
        def stream(body: bytes):
            with http.stream("POST", f"{base_url}/generate", content=body,
                             headers={"Content-Type": "application/json"}) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    yield line.encode()

        yield stream


def merge_ttft(ttft_ms: float, input_len: int, source: str, result_json: str, model: str,
               phases_ms: dict[str, float] | None = None, by_client_ms: dict[str, float] | None = None) -> dict:
    """Add an HTTP TTFT of a server of ``model`` to a result, as a ratio to its
    prefill floor at that length, with the journey's phases and each client's
    median (``by_client_ms``) when measured."""
    results = json.loads(Path(result_json).read_text())
    machine = Machine(**results["machine"])
    floor_s = machine.floor_s(*ModelCost.of_name(model).prefill(input_len))
    results["http_ttft"] = {"model": model, "tokens": input_len, "ttft_median_ms": ttft_ms,
                            "prefill_floor_ms": floor_s * 1e3, "ratio": ttft_ms / (floor_s * 1e3), "source": source,
                            "phases_median_ms": phases_ms or {}, "ttft_median_ms_by_client": by_client_ms or {}}
    results["targets"] = check_targets(results)
    Path(result_json).write_text(json.dumps(results, indent=2))
    return results


def merge_itl(itl_ms: float, source: str, result_json: str) -> dict:
    results = json.loads(Path(result_json).read_text())
    lead = results["models"][0]["model"]
    step_s = _row(results, lead, "decode", "batch", 1)["step_s"]
    results["http"] = {"model": lead, "itl_median_ms": itl_ms, "decode_step_ms": step_s * 1e3,
                       "ratio": itl_ms / (step_s * 1e3), "source": source}
    results["targets"] = check_targets(results)
    Path(result_json).write_text(json.dumps(results, indent=2))
    return results


def _save(results: dict, out: Path) -> None:
    """Write what is measured so far: a run cut short still leaves its rows."""
    results["targets"] = check_targets(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def run(cfg: RooflineConfig, argv: list[str], out: Path) -> dict:
    import torch

    machine = measure_machine()
    print(f"{machine.gpu}: copy {machine.copy_bytes_per_s / 1e12:.2f} TB/s (read + written), "
          f"bf16 matmul {machine.matmul_flops_per_s / 1e12:.0f} TFLOP/s", flush=True)
    results: dict = {"gpu": machine.gpu, "command": "python -m pdserve.benchmarks.roofline " + " ".join(argv),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "torch": torch.__version__, "machine": asdict(machine), "config": asdict(cfg), "models": []}
    if cfg.gemv_sweep:
        results["gemv_sweep"] = gemv_sweep(cfg.models)
    for name in cfg.models:
        results["models"].append(bench_model(cfg, name, machine))
        _save(results, out)
    if not cfg.skip_transfer and cfg.models:
        prefill = _row(results, cfg.models[0], "prefill", "tokens", cfg.transfer_tokens)
        results["transfers"] = []
        for backend in cfg.transfer_backends:
            t = bench_transfer(cfg, machine, cfg.models[0], backend)
            if prefill:
                t["ttft_share"] = t["exposed_s"] / (prefill["step_s"] + t["exposed_s"])
                t["ttft_share_cold"] = t["step_s"] / (prefill["step_s"] + t["step_s"])
            results["transfers"].append(t)
            print(f"transfer {backend:<9}{t['tokens']} tokens {t['bytes'] / 2**20:.0f} MiB: {t['step_s'] * 1e3:.3f} ms "
                  f"(landed {t['sender_done_s'] * 1e3:.3f} ms), fraction of copy {t['fraction']:.2f} "
                  f"(landed {t['fraction_landed']:.2f}); posting {t['post_s'] * 1e3:.3f} ms {t['posting_us']}; "
                  f"behind a forward: exposed {t['exposed_s'] * 1e3:.3f} ms, fraction {t['fraction_exposed']:.2f} "
                  f"(landed on P {t['exposed_landed_s'] * 1e3:.3f} ms; decode side polls every {t['decode_poll_us']:.1f} us)"
                  + (f"; copy kernel alone {t['kernel_s'] * 1e3:.3f} ms, fraction {t['fraction_kernel']:.2f}"
                     if "kernel_s" in t else ""), flush=True)
            _save(results, out)
        results["transfer"] = min(results["transfers"], key=lambda t: t["exposed_s"])
        _save(results, out)
    if cfg.compare_pdl and cfg.models:
        results["without_pdl"] = decode_without_pdl(cfg, cfg.models[0], machine)
    if cfg.kernel_profile:  # last: the profiler slows every launch after it
        for info in results["models"]:
            profile_model(cfg, info)
            _save(results, out)
    _save(results, out)
    return results


def build_parser() -> argparse.ArgumentParser:
    from pdserve.model.attention.base import ATTENTION_BACKENDS

    ap = argparse.ArgumentParser(prog="roofline", description=__doc__.split("\n")[0])
    add_dataclass_args(ap, RooflineConfig, choices={"attention_backend": ATTENTION_BACKENDS.names(),
                                                    "transfer_backends": TRANSFER_BACKENDS.names()})
    add_dataclass_args(ap, MergeConfig)
    return ap


def parse_args(argv: list[str]) -> tuple[RooflineConfig, MergeConfig]:
    ns = build_parser().parse_args(argv)
    return config_from_args(RooflineConfig, ns), config_from_args(MergeConfig, ns)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, merge = parse_args(argv)
    if merge.merge_itl:
        itl = json.loads(Path(merge.merge_itl).read_text())["runs"][0]["metrics"]["itl_ms"]["median"]
        results = merge_itl(itl, f"pdserve bench ({merge.merge_itl})", merge.into)
    elif merge.http_itl:
        results = merge_itl(http_itl_ms(merge.http_itl), "httpx /generate stream, 8 x (1024 in, 128 out)", merge.into)
    elif merge.http_ttft:
        by_client = {client: http_ttft_ms(merge.http_ttft, client=client, seed=seed)
                     for seed, client in enumerate(TTFT_CLIENTS, start=1)}
        ttft_ms, phases_ms = by_client[TTFT_CLIENTS[0]]
        results = merge_ttft(ttft_ms, 512, f"{TTFT_CLIENTS[0]} /generate stream, 8 x (512 in), one at a time",
                             merge.into, model=cfg.models[0], phases_ms=phases_ms,
                             by_client_ms={client: t for client, (t, _) in by_client.items()})
        print(f"HTTP TTFT {ttft_ms:.2f} ms ("
              + ", ".join(f"{client} {t:.2f}" for client, (t, _) in by_client.items())
              + "); journey medians (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in phases_ms.items()))
    else:
        out = Path(cfg.output_json or f"benchmarks/results/roofline-{datetime.date.today().isoformat()}.json")
        results = run(cfg, argv, out)
        print(f"wrote {out}")
    for t in results["targets"]:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['target']:<40} {t['value']:>8} (limit {t['limit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
