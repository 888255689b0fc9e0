"""The engine's host time per decode step, without the model.

On a GPU a small model's decode step is one CUDA graph replay of 2-3 ms;
everything else the engine process does per step is Python on one core
(receive, schedule, step inputs, sampling bookkeeping, stop checks, the
step's message to the front, the overlap schedule's bookkeeping) and must
fit well inside that, or the GPU waits for the host.

This runs the real ``Engine`` (scheduler, sampler, overlap schedule, output
path, and the pipe to a process that drains and decodes it as a front does)
on the CPU, with the model stubbed at the graph replay: the runner takes the
GPU path up to it (numpy step inputs, the graph's packed input buffers,
tokens fed from the device to the step launched ahead) and the "graph"
hands back precomputed logits of a realistic vocabulary. Sampling is
measured two ways: ``stub`` replaces the device-side argmax with precomputed
token ids (what the host pays on a GPU, less the argmax's kernel launches),
``device`` runs the real argmax over the logits on the CPU (one thread).

Reported per batch: wall µs per decode step (median, mean, p90), CPU µs per
step (the quotable figure on a shared machine: waits and other processes do
not count), µs per request, and inclusive CPU µs per phase from a second
pass with a timer around each of the engine's phases (``other``: what the
top-level phases do not cover, part of the timers' own cost included).

``--against DIR`` also measures the pdserve package under ``DIR``
(``DIR/pdserve``, e.g. a git worktree of an older commit; its processes run
with ``PYTHONPATH=DIR``), in fresh processes that alternate with this
package's, and reports this package's figures over that one's.

    python -m pdserve.benchmarks.engine_host --output-json engine-host.json
    python -m pdserve.benchmarks.engine_host --batch-sizes 256 --profile-dir prof/
    python -m pdserve.benchmarks.engine_host --against /tmp/base --repeats 3
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.common.args import add_dataclass_args, config_from_args, flag
from pdserve.common.env import child_environ

SAMPLING_MODES = ("stub", "device")
STEP_MARGIN = 8  # decode steps every request still has to go when measuring ends
MAX_FILL_TURNS = 10_000  # loop turns allowed for admitting and prefilling the batch
PROFILE_TOP = 30


@dataclass(frozen=True)
class EngineHostConfig:
    """What to measure: batches, request shape, sampling modes, passes."""

    batch_sizes: tuple[int, ...] = field(default=(64, 128, 256), metadata=flag("decode batch sizes", nargs="+", type=int))
    vocab_size: int = field(default=128256, metadata=flag("logits per row (Llama 3's; the built-in model's is 1000)"))
    prompt_len: int = field(default=512, metadata=flag("prompt tokens per request"))
    steps: int = field(default=200, metadata=flag("decode steps measured per pass"))
    device_steps: int = field(default=40, metadata=flag(
        "decode steps measured per pass with --sampling device (its argmax costs tens of ms a step on a CPU)"))
    warmup_steps: int = field(default=20, metadata=flag("decode steps run before measuring"))
    page_size: int = field(default=16, metadata=flag("tokens per KV page"))
    stream_interval: int = field(default=1, metadata=flag("the engine's --stream-interval"))
    sampling: tuple[str, ...] = field(default=SAMPLING_MODES, metadata=flag(
        "stub: the device-side argmax returns precomputed ids; device: the real argmax, on the CPU",
        nargs="+", choices=SAMPLING_MODES))
    disable_overlap_schedule: bool = field(default=False, metadata=flag("measure the serial schedule"))
    full_cache: bool = field(default=False, metadata=flag(
        "fill every free page of the pool with cached prompts before measuring, as on a server that has run a "
        "while: each page a decode step needs is then evicted from the prefix cache"))
    repeats: int = field(default=1, metadata=flag("runs of every measurement (alternating sides with --against)"))
    against: str | None = field(default=None, metadata=flag(
        "also measure the pdserve package DIR/pdserve (e.g. a worktree of an older commit)", metavar="DIR"))
    profile_dir: str | None = field(default=None, metadata=flag(
        "also profile each measurement with cProfile (a third pass) and write .prof and top-function files here"))
    output_json: str | None = field(default=None, metadata=flag("write the figures here (default: print only)"))


# ---- the model, stubbed at the graph replay --------------------------------------------
class _NoGraph:
    """A captured graph whose replay costs nothing: its output is precomputed."""

    def replay(self) -> None:
        pass


class _StubAttention:
    """The host side of a graph replay's attention metadata: views of the
    graph's fixed index buffers (as the Triton backend's), no planning."""

    accepts_stored_kv = True
    supports_cuda_graph = True

    def init_graph_state(self, inputs: Any) -> None:
        self._inputs = inputs

    def graph_metadata(self, step: Any, batch_size: int) -> tuple:
        g = self._inputs
        return (g.device_view("kv_indptr", batch_size + 1), g.device_view("kv_indices", g.max_pages),
                g.device_view("seq_lens", batch_size))

    def prepare(self, batch: Any) -> None:
        pass


class _StubModel:
    """An eager forward (prefill) that returns the first rows of precomputed logits."""

    def __init__(self, logits: Any) -> None:
        self.logits = logits

    def __call__(self, batch: Any, attn: Any, kv_buffer: Any) -> Any:
        return self.logits[: batch.batch_size]


def _precomputed(batch_size: int, vocab_size: int) -> tuple[Any, Any]:
    """(logits [batch_size, vocab], the token ids their argmax gives): row i
    peaks at id 1 + i mod (vocab - 2), never the EOS id (the last)."""
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch_size, vocab_size, generator=g)
    tokens = 1 + torch.arange(batch_size) % (vocab_size - 2)
    logits[torch.arange(batch_size), tokens] = 100.0
    return logits, tokens


def _stub_model(engine: Any, logits: Any, overlap: bool) -> None:
    """The runner takes the GPU path (numpy step inputs, CUDA graph inputs,
    the overlap schedule) and replays graphs that return ``logits``."""
    from pdserve.model.cuda_graph import CudaGraphRunner, capture_batch_sizes

    runner = engine.runner
    runner.attn, runner.model = _StubAttention(), _StubModel(logits)
    runner._fast, runner.lookahead = True, overlap
    sizes = capture_batch_sizes(logits.shape[0], None)
    page_size = engine.cfg.page_size
    max_pages = sizes[-1] * min(-(-runner.context_len // page_size), runner.layout.num_pages) + sizes[-1]
    graphs = CudaGraphRunner(runner.model, runner.attn, runner.pool.buffer, sizes, True, max_pages, page_size,
                             runner.device)
    for size in sizes:
        graphs._graphs[size], graphs._outputs[size] = _NoGraph(), logits[:size]
    runner.graphs = graphs


@contextmanager
def _stub_argmax(tokens: Any) -> Iterator[None]:
    """The sampler's device-side argmax (the whole draw of a greedy batch)
    returns the precomputed ids."""
    from pdserve.engine import sampler

    real = sampler.argmax_rows
    sampler.argmax_rows = lambda logits: tokens[: logits.shape[0]].clone()
    try:
        yield
    finally:
        sampler.argmax_rows = real


# ---- the front: a process that drains the engine's pipe ---------------------------------
def _drain(front: Any, engine_end: Any, report: Any) -> None:
    """Decode every message as a front does, until the engine closes the pipe;
    report (messages, tokens)."""
    from pdserve.common import codec, messages  # noqa: F401 (registers the message types)

    engine_end.close()
    received = tokens = 0
    try:
        while True:
            msg = codec.decode(front.recv_bytes())
            received += 1
            tokens += sum(map(len, msg.token_ids)) + sum(len(o.token_ids) for o in msg.outputs)
    except (EOFError, OSError):
        pass
    report.send((received, tokens))


@dataclass
class _Front:
    process: Any
    report: Any

    def result(self) -> tuple[int, int]:
        messages, tokens = self.report.recv()
        self.process.join()
        return messages, tokens


def _start_front() -> tuple[Any, _Front]:
    """The engine's end of a pipe whose other end a forked process drains."""
    ctx = mp.get_context("fork")  # the drain needs no torch: a fork starts in milliseconds
    ours, front = ctx.Pipe(duplex=True)
    report_read, report_write = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_drain, args=(front, ours, report_write), daemon=True)
    process.start()
    front.close()
    report_write.close()
    return ours, _Front(process, report_read)


# ---- one engine, filled with a decoding batch -----------------------------------------
def _model_dir(vocab_size: int) -> str:
    """A Llama shape with the given vocabulary and everything else tiny (its
    forward never runs; loading it must be cheap)."""
    from pdserve.model.builtin import config_dir_for

    shape = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
             "vocab_size": vocab_size, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "max_position_embeddings": 131072, "tie_word_embeddings": True, "torch_dtype": "float32",
             "bos_token_id": 0, "eos_token_id": vocab_size - 1}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"engine-host-v{vocab_size}.json"
        path.write_text(json.dumps(shape))
        return config_dir_for(path)


def _max_new_tokens(cfg: EngineHostConfig) -> int:
    passes = 2 + (cfg.profile_dir is not None)
    return cfg.warmup_steps + passes * max(cfg.steps, cfg.device_steps) + STEP_MARGIN


def _engine(cfg: EngineHostConfig, model_dir: str, batch_size: int, conn: Any) -> Any:
    from pdserve.common.config import ServerConfig
    from pdserve.engine.engine import Engine

    seq_len = cfg.prompt_len + _max_new_tokens(cfg)
    pages_per_req = -(-seq_len // cfg.page_size) + 1
    server_cfg = ServerConfig(
        model_path=model_dir, device="cpu", load_format="dummy", dtype="float32", page_size=cfg.page_size,
        stream_interval=cfg.stream_interval, max_running_requests=batch_size, context_length=seq_len + 1,
        max_total_tokens=2 * batch_size * pages_per_req * cfg.page_size,
        disable_overlap_schedule=cfg.disable_overlap_schedule,
    ).resolve()
    return Engine(server_cfg, model_dir, conn)


def _admit(engine: Any, cfg: EngineHostConfig, batch_size: int) -> None:
    """``batch_size`` greedy requests, through the codec as the front sends them
    (ids as long as the front's: 32 hex digits and the choice's index)."""
    import torch
    from pdserve.common import codec
    from pdserve.common.messages import GenerateRequest
    from pdserve.common.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=_max_new_tokens(cfg), temperature=0.0)
    g = torch.Generator().manual_seed(1)
    for i in range(batch_size):
        prompt = torch.randint(1, cfg.vocab_size - 1, (cfg.prompt_len,), generator=g).tolist()
        engine._handle(codec.decode(codec.encode(GenerateRequest(rid=f"{i:032x}-0", input_ids=prompt, params=params))))


def _turn(engine: Any) -> None:
    """One turn of the engine's loop (``Engine.run_forever``)."""
    engine._receive()
    engine.run_once()


def _fill(engine: Any, cfg: EngineHostConfig, batch_size: int) -> None:
    """Admit and prefill the batch, then run the warm-up decode steps."""
    _admit(engine, cfg, batch_size)
    sched = engine.scheduler
    for _ in range(MAX_FILL_TURNS):
        if not sched.waiting and sched.chunked is None and len(sched.running) == batch_size:
            break
        _turn(engine)
    else:
        raise RuntimeError(f"the batch did not fill in {MAX_FILL_TURNS} turns")
    for _ in range(cfg.warmup_steps):
        _turn(engine)


def _fill_cache(engine: Any, cfg: EngineHostConfig) -> int:
    """Every free page to the prefix cache, as prompts of ``cfg.prompt_len``
    tokens that nobody runs; returns the pages the cache holds."""
    import random

    pool, rng = engine.pool, random.Random(2)
    while pool.num_free_pages:
        num_pages = min(max(cfg.prompt_len // cfg.page_size, 1), pool.num_free_pages)
        pages = pool.alloc(num_pages)
        engine.cache.insert([rng.randrange(1, cfg.vocab_size) for _ in range(num_pages * cfg.page_size)], pages)
        pool.release(pages)
    return engine.cache.num_cached_pages


# ---- passes -------------------------------------------------------------------------------
def _plain_pass(engine: Any, steps: int) -> dict[str, float]:
    """Wall and CPU time of ``steps`` loop turns, nothing added."""
    wall_ns = []
    cpu_start = time.thread_time_ns()
    for _ in range(steps):
        start = time.perf_counter_ns()
        _turn(engine)
        wall_ns.append(time.perf_counter_ns() - start)
    cpu_ns = time.thread_time_ns() - cpu_start
    wall_ns.sort()
    return {"median": wall_ns[len(wall_ns) // 2] / 1e3, "mean": statistics.fmean(wall_ns) / 1e3,
            "p90": wall_ns[int(len(wall_ns) * 0.9)] / 1e3, "cpu": cpu_ns / steps / 1e3}


def _phases(engine: Any) -> list[tuple[str, object, str]]:
    """(phase, owner, method): top-level phases of a loop turn first; a name
    with a slash lies inside the phase before its slash."""
    from pdserve.engine import sampler

    runner = engine.runner
    return [
        ("receive", engine, "_receive"), ("reclaim", engine.pool, "reclaim"), ("role_poll", engine.role, "poll"),
        ("schedule", engine.scheduler, "schedule"), ("step", engine, "_step"),
        ("finish_done", engine, "_finish_done"), ("flush", engine, "_flush"),
        ("step/forward", engine, "_forward"), ("step/forward/take_ahead", runner, "take_ahead"),
        ("step/advance", engine.scheduler, "advance"), ("step/sample", engine.sampler, "sample_async"),
        ("step/launch_ahead", engine, "_launch_ahead"), ("step/wait", sampler.PendingSample, "wait"),
        ("step/record", engine, "_record"), ("step/log", engine, "_log_decode"),
        ("runner/step_inputs", runner, "_step_inputs"), ("runner/graph_inputs", runner.graphs, "replay"),
        ("finish_done/emit", engine, "emit"), ("flush/send", engine.conn, "send_bytes"),
    ]


@contextmanager
def _timed(engine: Any) -> Iterator[dict[str, int]]:
    """Timers around every phase that exists in this engine; yields ns by phase."""
    totals: dict[str, int] = defaultdict(int)
    undo: list[Callable[[], None]] = []

    def wrap(name: str, owner: object, attr: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        clock = time.thread_time_ns  # the engine thread's CPU: neither waits nor other processes count

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += clock() - start

        if isinstance(owner, type):  # a class: the wrapper becomes the method, self passes through
            original = owner.__dict__[attr]
            setattr(owner, attr, timed)
            undo.append(lambda: setattr(owner, attr, original))
        else:
            setattr(owner, attr, timed)
            undo.append(lambda: delattr(owner, attr))

    for name, owner, attr in _phases(engine):
        wrap(name, owner, attr)
    try:
        yield totals
    finally:
        for step in reversed(undo):
            step()


def _phase_pass(engine: Any, steps: int) -> dict[str, float]:
    """Inclusive CPU µs per step of each phase, and ``other``."""
    with _timed(engine) as totals:
        start = time.thread_time_ns()
        for _ in range(steps):
            _turn(engine)
        total_ns = time.thread_time_ns() - start
    phases = {name: ns / steps / 1e3 for name, ns in totals.items()}
    top = sum(us for name, us in phases.items() if "/" not in name)
    return {"total": total_ns / steps / 1e3, **phases, "other": total_ns / steps / 1e3 - top}


def _profile_pass(engine: Any, steps: int, out: Path, label: str) -> None:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        _turn(engine)
    profile.disable()
    out.mkdir(parents=True, exist_ok=True)
    profile.dump_stats(str(out / f"{label}.prof"))
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(PROFILE_TOP)
    (out / f"{label}.txt").write_text(text.getvalue())


def _per_request(step: dict[str, float], batch_size: int) -> dict[str, float]:
    return {"median": step["median"] / batch_size, "cpu": step["cpu"] / batch_size}


def measure_one(cfg: EngineHostConfig, model_dir: str, batch_size: int, sampling: str) -> dict[str, Any]:
    """One engine, one batch, one sampling mode: the plain pass, the phase pass
    (and a profile)."""
    conn, front = _start_front()
    engine = _engine(cfg, model_dir, batch_size, conn)
    logits, tokens = _precomputed(max(batch_size, 256), cfg.vocab_size)
    _stub_model(engine, logits, overlap=not cfg.disable_overlap_schedule)
    steps = cfg.steps if sampling == "stub" else cfg.device_steps
    with _stub_argmax(tokens) if sampling == "stub" else nullcontext(), closing(conn):
        _fill(engine, cfg, batch_size)
        cached_pages = _fill_cache(engine, cfg) if cfg.full_cache else engine.cache.num_cached_pages
        step = _plain_pass(engine, steps)
        phases = _phase_pass(engine, steps)
        if cfg.profile_dir:
            _profile_pass(engine, steps, Path(cfg.profile_dir), f"engine-host-b{batch_size}-{sampling}")
        running = len(engine.scheduler.running)
    messages, streamed = front.result()
    if running != batch_size:
        raise RuntimeError(f"{batch_size - running} requests left the batch while it was measured")
    return {"batch_size": batch_size, "sampling": sampling, "overlap": not cfg.disable_overlap_schedule,
            "step_us": step, "per_request_us": _per_request(step, batch_size), "phases_us": phases,
            "steps": steps, "messages": messages, "tokens_streamed": streamed, "cached_pages": cached_pages}


def _quiet_logs() -> None:
    """The engine logs as it does when served (INFO), to nowhere: formatting
    a line is part of its cost, printing it is not."""
    handler = logging.StreamHandler(open(os.devnull, "w"))  # open as long as the process
    handler.setFormatter(logging.Formatter("[%(asctime)s engine] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def measure(cfg: EngineHostConfig) -> list[dict[str, Any]]:
    """Every (batch, sampling mode) in this process, ``cfg.repeats`` times."""
    import torch

    torch.set_num_threads(1)  # an engine's host thread; the CPU argmax runs on it too
    _quiet_logs()
    model_dir = _model_dir(cfg.vocab_size)
    rows = []
    for _ in range(cfg.repeats):
        for batch_size in cfg.batch_sizes:
            for sampling in cfg.sampling:
                rows.append(measure_one(cfg, model_dir, batch_size, sampling))
                _log(_row_line(rows[-1]))
    return rows


# ---- sides: this package against another --------------------------------------------------
def _package_dir(root: Path | None) -> Path:
    if root is not None:
        return root / "pdserve"
    return Path(__file__).resolve().parents[1]  # this package's root (benchmarks/ sits in it)


def _commit(package: Path) -> str:
    """The package's git commit, ``-dirty`` when its tracked files changed."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + ("-dirty" if head and git("status", "--porcelain", "--untracked-files=no") else "")


def _side_rows(cfg: EngineHostConfig, root: Path | None, tmp: Path, name: str) -> list[dict[str, Any]]:
    """One run of this file in a fresh process that imports pdserve from
    ``root`` (None: as this process does)."""
    out = tmp / f"{name}.json"
    worker = dataclasses.replace(cfg, repeats=1, against=None, profile_dir=None, output_json=str(out))
    environ = child_environ({} if root is None else {"PYTHONPATH": str(root)})
    # -P: the script's folder (benchmarks/) must not shadow top-level modules.
    subprocess.run([sys.executable, "-P", __file__, *_argv_of(worker)], env=environ, check=True)
    return json.loads(out.read_text())["rows"]


def _argv_of(cfg: EngineHostConfig) -> list[str]:
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = "--" + f.name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(name)
        elif isinstance(value, tuple):
            argv += [name, *map(str, value)]
        else:
            argv += [name, str(value)]
    return argv


def compare(cfg: EngineHostConfig) -> dict[str, Any]:
    """This package and ``cfg.against``'s, in alternating fresh processes."""
    against = Path(cfg.against).resolve()
    if not (against / "pdserve" / "__init__.py").is_file():
        raise SystemExit(f"--against {against}: no pdserve package under it")
    runs: dict[str, list] = {"this": [], "against": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(cfg.repeats):
            order = ["against", "this"] if r % 2 == 0 else ["this", "against"]  # drift cancels out
            for side in order:
                _log(f"repeat {r + 1}/{cfg.repeats}: {side}")
                runs[side] += _side_rows(cfg, against if side == "against" else None, Path(tmp), f"{side}-{r}")
    this, other = _by_case(runs["this"]), _by_case(runs["against"])
    rows = []
    for case, mine in this.items():
        theirs = other[case]
        rows.append({"batch_size": case[0], "sampling": case[1], "this": mine, "against": theirs,
                     "ratio_step_us": mine["step_us"]["median"] / theirs["step_us"]["median"],
                     "ratio_cpu_us": mine["step_us"]["cpu"] / theirs["step_us"]["cpu"]})
    return {"this": {"package": str(_package_dir(None)), "commit": _commit(_package_dir(None))},
            "against": {"package": str(_package_dir(against)), "commit": _commit(_package_dir(against))},
            "rows": rows}


def _by_case(rows: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    """Repeats of a (batch, sampling) case merged: medians of their figures,
    every run's median step kept."""
    groups: dict[tuple[int, str], list] = defaultdict(list)
    for row in rows:
        groups[(row["batch_size"], row["sampling"])].append(row)
    merged = {}
    for case, group in groups.items():
        step = {k: statistics.median(r["step_us"][k] for r in group) for k in group[0]["step_us"]}
        names = {n for r in group for n in r["phases_us"]}
        phases = {n: statistics.median(r["phases_us"].get(n, 0.0) for r in group) for n in sorted(names)}
        merged[case] = {"step_us": step, "per_request_us": _per_request(step, case[0]), "phases_us": phases,
                        "runs_median_step_us": [r["step_us"]["median"] for r in group]}
    return merged


# ---- output ----------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[engine_host] {message}", file=sys.stderr, flush=True)


def _row_line(row: dict[str, Any]) -> str:
    s = row["step_us"]
    return (f"batch {row['batch_size']:>4} sampling {row['sampling']:<6}: {s['median']:8.0f} us/step median "
            f"(mean {s['mean']:.0f}, p90 {s['p90']:.0f}, cpu {s['cpu']:.0f}), "
            f"{row['per_request_us']['cpu']:.2f} us CPU/request")


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.engine_host",
                                     description="The engine's host µs per decode step, the model stubbed out.")
    add_dataclass_args(parser, EngineHostConfig)
    cfg = config_from_args(EngineHostConfig, parser.parse_args(argv))
    result: dict[str, Any] = {
        "command": "python -m pdserve.benchmarks.engine_host " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(), "config": dataclasses.asdict(cfg),
    }
    if cfg.against:
        result.update(compare(cfg))
        for row in result["rows"]:
            _log(f"batch {row['batch_size']:>4} sampling {row['sampling']:<6}: "
                 f"{row['this']['step_us']['median']:.0f} us/step against {row['against']['step_us']['median']:.0f} "
                 f"({row['ratio_step_us']:.2f}x; cpu {row['ratio_cpu_us']:.2f}x)")
    else:
        result["commit"] = _commit(_package_dir(None))
        result["rows"] = measure(cfg)
    if cfg.output_json:
        Path(cfg.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output_json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
