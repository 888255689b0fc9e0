"""CPU cost of the serving path, in CPU microseconds per output token.

A token that reaches a client has been paid for in CPU time by every process it
crossed: the engine that computed it, the HTTP front that detokenized, framed
and wrote it, and any router that relayed it. On a GPU host the front and the
router run on a few host cores next to the GPU; when they need more CPU per
token than the host can give, they, not the GPU, bound throughput and
inter-token latency. This benchmark turns that cost into numbers:

``front``
    Starts one instance (``pdserve serve``; the built-in ``tiny`` model on CPU
    unless extra server flags after ``--`` say otherwise) and drives it with
    ``pdserve bench`` (streamed), then with an in-process client at the same
    concurrency (``"stream": false``). Around each run it reads the CPU time
    (utime + stime, ``/proc/PID/stat``) of the front (the ``serve`` process and
    its helpers) and of the engine (the multiprocessing spawn child) apart, and
    divides by the output tokens the server reported (``usage``).

``router``
    Starts ``fake_upstream`` (a cheap OpenAI server streaming one token per SSE
    chunk at a fixed interval) and puts each router in front of it in turn:
    ``pdserve router`` (colocated, and PD with the fake playing both prefill
    and decode), SGLang's Rust ``sglang-router``, and no router at all (the
    baseline). For each it reports the router's CPU per relayed token (its
    whole process tree), ITL and TPOT p50 through it, and the ITL p50 it adds
    over the baseline.

Every process runs on 127.0.0.1 on free ports, every wait is bounded, and every
child is stopped on the way out (also on Ctrl-C / SIGTERM). Figures go to a
JSON file (``--output-json``) and a short table on stdout. ``--profile-dir``
also records a py-spy profile (the front's ``serve`` process, or the colocated
``pdserve router``) and writes the top functions by inclusive and own samples;
CPU figures of a profiled run include the sampler's disturbance.

Examples::

    python -m pdserve.benchmarks.serving_cost front --output-json front.json
    python -m pdserve.benchmarks.serving_cost front --concurrency 32 -- --max-running-requests 32
    python -m pdserve.benchmarks.serving_cost router --output-json router.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
ENGINE_CMDLINE_MARK = "spawn_main"
PROMPT_ID_RANGE = (10, 500)
STOP_GRACE_S = 10.0
POLL_INTERVAL_S = 0.25
ROUTER_TARGETS = ("direct", "pdserve", "sglang", "pdserve-pd", "sglang-pd")
DEFAULT_ROUTER_TARGETS = ("direct", "pdserve", "sglang", "pdserve-pd")


def log(message: str) -> None:
    print(f"[serving_cost] {message}", file=sys.stderr, flush=True)


class CostError(RuntimeError):
    """The benchmark cannot go on: a process did not start or a run failed."""


# --------------------------------------------------------------------------- /proc


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a live process (all its threads, live or exited), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def proc_parents() -> dict[int, int]:
    """pid -> parent pid of every live process."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rfind(b")") + 2:].split()[1])
    return parents


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in proc_parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def split_front_engine(root_pid: int, engine_mark: str = ENGINE_CMDLINE_MARK) -> tuple[list[int], list[int]]:
    """The serve tree split in two: the engine (the spawn child whose command line
    holds ``engine_mark``, with its descendants) and the front (everything else)."""
    engine: list[int] = []
    for pid in process_tree(root_pid):
        if pid != root_pid and pid not in engine and engine_mark in proc_cmdline(pid):
            engine.extend(process_tree(pid))
    front = [pid for pid in process_tree(root_pid) if pid not in engine]
    return front, engine


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of a set of processes at one moment."""

    cpu_s: dict[int, float]
    at_s: float

    @classmethod
    def take(cls, pids: list[int]) -> CpuSnapshot:
        values = {pid: proc_cpu_s(pid) for pid in pids}
        return cls({pid: v for pid, v in values.items() if v is not None}, time.perf_counter())

    def since(self, before: CpuSnapshot) -> float:
        """CPU seconds spent between ``before`` and this snapshot (new pids from zero)."""
        return sum(v - before.cpu_s.get(pid, 0.0) for pid, v in self.cpu_s.items())


def system_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLOCK_TICKS_PER_S


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])


def start_child(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
    """A child in its own session (so one signal reaches all it spawns), output to a log."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    log(f"started {name} (pid {proc.pid}): {' '.join(argv)}")
    return Child(name, proc, log_path)


def stop_child(child: Child) -> None:
    """SIGTERM to the child's process group, SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, sig)
        try:
            child.proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.proc.pid, signal.SIGKILL)  # leftovers of the group


@contextlib.contextmanager
def running(name: str, argv: list[str], log_dir: Path) -> Iterator[Child]:
    child = start_child(name, argv, log_dir)
    try:
        yield child
    finally:
        stop_child(child)
        log(f"stopped {name}")


def http_get_status(url: str, timeout_s: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def http_get_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_healthy(child: Child, url: str, timeout_s: float) -> None:
    """Until ``GET url`` answers 200; fails fast when the child exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise CostError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        if http_get_status(url) == 200:
            return
        time.sleep(POLL_INTERVAL_S)
    raise CostError(f"{child.name}: {url} not 200 within {timeout_s:g} s:\n{child.log_tail()}")


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops its children."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class BenchRun:
    """One ``pdserve bench`` run: its metrics (first run of its JSON) and its own cost."""

    metrics: dict[str, Any]
    client_cpu_s: float
    client_wall_s: float


def bench_argv(base_url: str, out_json: Path, workload: Workload, extra: list[str]) -> list[str]:
    return python_module(
        "pdserve.cli", "bench", "--base-url", base_url, "--backend", "openai",
        "--random-input-len", str(workload.input_len), "--random-output-len", str(workload.output_len),
        "--num-prompts", str(workload.num_prompts), "--max-concurrency", str(workload.concurrency),
        "--ignore-eos", "--warmup-requests", "0", "--disable-tqdm", "--output-json", str(out_json),
        "--seed", str(workload.seed), *extra)


def run_bench(argv: list[str], log_dir: Path, name: str, timeout_s: float) -> BenchRun:
    """Runs the client to the end; its CPU time is the rusage of reaped children."""
    out_json = Path(argv[argv.index("--output-json") + 1])
    cpu_before, start = children_cpu_s(), time.perf_counter()
    child = start_child(name, argv, log_dir)
    try:
        returncode = child.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_child(child)
        raise CostError(f"{name} did not finish within {timeout_s:g} s:\n{child.log_tail()}") from None
    wall_s, cpu_s = time.perf_counter() - start, children_cpu_s() - cpu_before
    if returncode != 0 or not out_json.exists():
        raise CostError(f"{name} failed ({returncode}):\n{child.log_tail()}")
    metrics = json.loads(out_json.read_text())["runs"][0]["metrics"]
    if metrics["failed"]:
        log(f"warning: {name}: {metrics['failed']} failed requests")
    return BenchRun(metrics, cpu_s, wall_s)


@dataclass(frozen=True)
class Workload:
    input_len: int = 64
    output_len: int = 256
    num_prompts: int = 256
    concurrency: int = 64
    seed: int = 0


def random_prompt(rng: random.Random, length: int, text: bool) -> list[int] | str:
    """``length`` random token ids, or as many random words (routers that take text only)."""
    ids = [rng.randrange(*PROMPT_ID_RANGE) for _ in range(length)]
    return " ".join(f"w{i}" for i in ids) if text else ids


def completion_body(model: str | None, prompt: list[int] | str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if model is not None:
        body["model"] = model
    return body


async def _post(session: Any, url: str, body: dict[str, Any]) -> int:
    """Output tokens of one completion (``usage.completion_tokens``); reads streams to the end."""
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise CostError(f"POST {url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        if not body["stream"]:
            return int((await resp.json(content_type=None))["usage"]["completion_tokens"])
        tokens = 0
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or {}
                tokens = int(usage.get("completion_tokens") or tokens)
        return tokens


@dataclass(frozen=True)
class ClientRun:
    output_tokens: int
    wall_s: float
    failed: int


async def _send_all(base_url: str, bodies: list[dict[str, Any]], concurrency: int, timeout_s: float) -> ClientRun:
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, read_bufsize=1 << 22,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def one(body: dict[str, Any]) -> int | None:
            async with slots:
                try:
                    return await _post(session, url, body)
                except (aiohttp.ClientError, asyncio.TimeoutError, CostError, KeyError, ValueError) as exc:
                    log(f"request failed: {exc!r}")
                    return None

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(b) for b in bodies))
        wall_s = time.perf_counter() - start
    done = [c for c in counts if c is not None]
    return ClientRun(sum(done), wall_s, len(counts) - len(done))


def send_requests(base_url: str, model: str | None, workload: Workload, stream: bool,
                  timeout_s: float, text: bool = False) -> ClientRun:
    """``num_prompts`` completions of random prompts at ``concurrency``."""
    rng = random.Random(workload.seed)
    bodies = [completion_body(model, random_prompt(rng, workload.input_len, text), workload.output_len, stream)
              for _ in range(workload.num_prompts)]
    return asyncio.run(_send_all(base_url, bodies, workload.concurrency, timeout_s))


def first_model(base_url: str) -> str | None:
    try:
        data = http_get_json(base_url.rstrip("/") + "/v1/models").get("data") or []
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        return None
    return str(data[0]["id"]) if data else None


# --------------------------------------------------------------------------- profiling


@dataclass
class Profiler:
    """``py-spy record --format raw`` on one process until stopped."""

    child: Child | None
    raw_path: Path

    @classmethod
    def start(cls, pid: int, raw_path: Path, log_dir: Path, subprocesses: bool = False) -> Profiler:
        exe = shutil.which("py-spy")
        if exe is None:
            log("warning: py-spy not found (pip install py-spy): no profile")
            return cls(None, raw_path)
        argv = [exe, "record", "--pid", str(pid), "--format", "raw", "--nolineno", "--nonblocking",
                "--rate", "100", "--output", str(raw_path)] + (["--subprocesses"] if subprocesses else [])
        return cls(start_child(f"py-spy-{raw_path.stem}", argv, log_dir), raw_path)

    def stop(self, top_n: int) -> dict[str, Any] | None:
        if self.child is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.child.proc.send_signal(signal.SIGINT)
        try:
            self.child.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_child(self.child)
        if not self.raw_path.exists():
            log(f"warning: py-spy wrote no profile:\n{self.child.log_tail()}")
            return None
        return summarise_collapsed(self.raw_path.read_text(errors="replace"), top_n)


def summarise_collapsed(text: str, top_n: int) -> dict[str, Any]:
    """Top functions of collapsed stacks (``f1;f2;...;leaf COUNT``) by inclusive and own samples."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count, frames = int(count_text), stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def top(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": name, "samples": n, "inclusive_pct": 100.0 * inclusive[name] / total,
                 "own_pct": 100.0 * own[name] / total} for name, n in counter.most_common(top_n)]

    return {"total_samples": total, "top_inclusive": top(inclusive) if total else [],
            "top_own": top(own) if total else []}


def profile_table(profile: dict[str, Any], title: str) -> str:
    lines = [f"{title}: {profile['total_samples']} samples (non-idle)"]
    for key, label in (("top_inclusive", "by inclusive samples"), ("top_own", "by own samples")):
        rows = [[f"{r['inclusive_pct']:.1f}", f"{r['own_pct']:.1f}", r["function"]] for r in profile[key]]
        lines += ["", f"  {label}", align(rows, ["incl %", "own %", "function"], left=(2,))]
    return "\n".join(lines)


# --------------------------------------------------------------------------- tables


def align(rows: list[list[str]], header: list[str], left: tuple[int, ...] = (0,)) -> str:
    """Columns padded to their widest cell; those in ``left`` left-aligned, the rest right."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def per_token_us(cpu_s: float, tokens: int) -> float | None:
    return 1e6 * cpu_s / tokens if tokens else None


def stat_ms(metrics: dict[str, Any], key: str, stat: str = "median") -> float | None:
    value = metrics.get(key)
    return value.get(stat) if isinstance(value, dict) else None


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=2))
        log(f"wrote {path}")


# --------------------------------------------------------------------------- front


@dataclass(frozen=True)
class FrontConfig:
    workload: Workload = Workload()
    modes: tuple[str, ...] = ("stream", "no-stream")
    server_args: tuple[str, ...] = ()
    engine_mark: str = ENGINE_CMDLINE_MARK
    startup_timeout_s: float = 600.0
    run_timeout_s: float = 900.0
    profile_dir: str | None = None
    profile_top_n: int = 25
    output_json: str | None = None
    log_dir: str | None = None


@dataclass
class Meter:
    """CPU of the front, the engine and the whole machine over one run."""

    serve_pid: int
    engine_mark: str
    front: list[int] = field(default_factory=list)
    engine: list[int] = field(default_factory=list)
    before: tuple[CpuSnapshot, CpuSnapshot, float] | None = None

    def start(self) -> None:
        self.front, self.engine = split_front_engine(self.serve_pid, self.engine_mark)
        if not self.engine:
            raise CostError(f"no engine process under pid {self.serve_pid} (cmdline mark {self.engine_mark!r})")
        self.before = (CpuSnapshot.take(self.front), CpuSnapshot.take(self.engine), system_busy_s())

    def stop(self) -> dict[str, float]:
        assert self.before is not None
        front0, engine0, busy0 = self.before
        front1, engine1 = CpuSnapshot.take(self.front), CpuSnapshot.take(self.engine)
        return {"front_cpu_s": front1.since(front0), "engine_cpu_s": engine1.since(engine0),
                "machine_busy_cpu_s": system_busy_s() - busy0, "window_s": front1.at_s - front0.at_s}


def front_row(mode: str, cpu: dict[str, float], tokens: int, wall_s: float, client_cpu_s: float,
              metrics: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "mode": mode, "output_tokens": tokens, "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s else None,
        "front_cpu_us_per_token": per_token_us(cpu["front_cpu_s"], tokens),
        "engine_cpu_us_per_token": per_token_us(cpu["engine_cpu_s"], tokens),
        "client_cpu_us_per_token": per_token_us(client_cpu_s, tokens),
        "front_cores": cpu["front_cpu_s"] / cpu["window_s"],
        "engine_cores": cpu["engine_cpu_s"] / cpu["window_s"],
        "client_cores": client_cpu_s / cpu["window_s"],
        "machine_busy_cores": cpu["machine_busy_cpu_s"] / cpu["window_s"],
        "client_cpu_s": client_cpu_s, **cpu,
    }
    if metrics is not None:
        row.update({"failed": metrics["failed"], "itl_p50_ms": stat_ms(metrics, "itl_ms"),
                    "tpot_p50_ms": stat_ms(metrics, "tpot_ms"), "ttft_p50_ms": stat_ms(metrics, "ttft_ms")})
    return row


def warm_up(base_url: str, model: str | None, workload: Workload, timeout_s: float) -> None:
    """Both paths once at full concurrency, with short outputs."""
    short = Workload(workload.input_len, 8, workload.concurrency, workload.concurrency, workload.seed + 1)
    for stream in (True, False):
        run = send_requests(base_url, model, short, stream, timeout_s)
        if run.failed:
            raise CostError(f"{run.failed} warmup requests failed")


def front_stream_run(cfg: FrontConfig, base_url: str, meter: Meter, log_dir: Path) -> dict[str, Any]:
    out_json = log_dir / "bench_stream.json"
    argv = bench_argv(base_url, out_json, cfg.workload, ["--dataset", "random-ids"])
    meter.start()
    profiler = (Profiler.start(meter.serve_pid, Path(cfg.profile_dir) / "front.txt", log_dir)
                if cfg.profile_dir else None)
    try:
        bench = run_bench(argv, log_dir, "bench-stream", cfg.run_timeout_s)
    finally:
        cpu = meter.stop()
        profile = profiler.stop(cfg.profile_top_n) if profiler else None
    m = bench.metrics
    row = front_row("stream", cpu, int(m["total_output_tokens"]), float(m["duration_s"]), bench.client_cpu_s, m)
    if profile is not None:
        row["profile"] = profile
    return row


def front_unstreamed_run(cfg: FrontConfig, base_url: str, model: str | None, meter: Meter) -> dict[str, Any]:
    meter.start()
    client0 = time.process_time()
    run = send_requests(base_url, model, cfg.workload, False, cfg.run_timeout_s)
    client_cpu_s = time.process_time() - client0
    cpu = meter.stop()
    row = front_row("no-stream", cpu, run.output_tokens, run.wall_s, client_cpu_s, None)
    row["failed"] = run.failed
    return row


def serve_argv(port: int, server_args: tuple[str, ...]) -> list[str]:
    return python_module("pdserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                         "--skip-server-warmup", *server_args)


def run_front(cfg: FrontConfig) -> dict[str, Any]:
    log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="serving_cost_front_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if cfg.profile_dir:
        Path(cfg.profile_dir).mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    rows = []
    with running("serve", serve_argv(port, cfg.server_args), log_dir) as serve:
        wait_healthy(serve, base_url + "/health", cfg.startup_timeout_s)
        model = first_model(base_url)
        warm_up(base_url, model, cfg.workload, cfg.run_timeout_s)
        meter = Meter(serve.proc.pid, cfg.engine_mark)
        for mode in cfg.modes:
            log(f"front: {mode} run")
            if mode == "stream":
                rows.append(front_stream_run(cfg, base_url, meter, log_dir))
            else:
                rows.append(front_unstreamed_run(cfg, base_url, model, meter))
        pids = {"serve": serve.proc.pid, "front": meter.front, "engine": meter.engine,
                "cmdlines": {pid: proc_cmdline(pid) for pid in meter.front + meter.engine}}
    return {"kind": "front", "config": asdict(cfg), "processes": pids, "cpu_count": os.cpu_count(),
            "log_dir": str(log_dir), "runs": rows}


def front_table(doc: dict[str, Any]) -> str:
    w = doc["config"]["workload"]
    header = ["mode", "tokens", "wall s", "tok/s", "front us/tok", "engine us/tok", "client us/tok",
              "front cores", "engine cores", "busy cores", "ITL p50 ms"]
    rows = [[r["mode"], str(r["output_tokens"]), num(r["wall_s"], 2), num(r["tokens_per_s"], 0),
             num(r["front_cpu_us_per_token"]), num(r["engine_cpu_us_per_token"]),
             num(r["client_cpu_us_per_token"]), num(r["front_cores"], 2), num(r["engine_cores"], 2),
             num(r["machine_busy_cores"], 2), num(r.get("itl_p50_ms"), 2)] for r in doc["runs"]]
    title = (f"front CPU cost: c={w['concurrency']} in={w['input_len']} out={w['output_len']} "
             f"prompts={w['num_prompts']} ({doc['cpu_count']} cores)")
    return title + "\n" + align(rows, header)


# --------------------------------------------------------------------------- router


@dataclass(frozen=True)
class RouterBenchConfig:
    workload: Workload = Workload()
    targets: tuple[str, ...] = DEFAULT_ROUTER_TARGETS
    token_interval_ms: float = 2.0
    policy: str = "cache_aware"
    tokenizer: str | None = None
    startup_timeout_s: float = 120.0
    run_timeout_s: float = 900.0
    profile_dir: str | None = None
    profile_top_n: int = 25
    output_json: str | None = None
    log_dir: str | None = None


@dataclass(frozen=True)
class Upstream:
    url: str
    prefill_url: str
    child: Child


def router_argv(target: str, port: int, up: Upstream, policy: str) -> list[str] | None:
    """The router's command line; None for the baseline without a router."""
    host = ["--host", "127.0.0.1", "--port", str(port), "--policy", policy]
    if target == "direct":
        return None
    if target.startswith("pdserve"):
        workers = ["--prefill", up.prefill_url, "--decode", up.url] if target.endswith("-pd") else ["--worker", up.url]
        return python_module("pdserve.cli", "router", *host, "--log-level", "warning", *workers)
    workers = (["--pd-disaggregation", "--prefill", up.prefill_url, "--decode", up.url]
               if target.endswith("-pd") else ["--worker-urls", up.url])
    return python_module("sglang_router.launch_router", *host, "--log-level", "warn",
                         "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), *workers)


def wait_relaying(child: Child, base_url: str, model: str, timeout_s: float) -> None:
    """Until a short streamed completion goes through the router."""
    wait_healthy(child, base_url + "/health", timeout_s)
    deadline = time.monotonic() + timeout_s
    probe = Workload(4, 2, 1, 1)
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise CostError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        with contextlib.suppress(CostError, OSError):
            if not send_requests(base_url, model, probe, True, 10.0, text=True).failed:
                return
        time.sleep(POLL_INTERVAL_S)
    raise CostError(f"{child.name}: no completion relayed within {timeout_s:g} s:\n{child.log_tail()}")


def router_bench_argv(cfg: RouterBenchConfig, base_url: str, model: str, out_json: Path) -> list[str]:
    extra = ["--dataset", "random", "--model", model]
    if cfg.tokenizer:
        extra += ["--tokenizer", cfg.tokenizer]
    return bench_argv(base_url, out_json, cfg.workload, extra)


def measure_target(cfg: RouterBenchConfig, target: str, base_url: str, router_pid: int | None,
                   up: Upstream, log_dir: Path) -> dict[str, Any]:
    model = "fake-model"
    warm = Workload(cfg.workload.input_len, 4, cfg.workload.concurrency, cfg.workload.concurrency)
    if send_requests(base_url, model, warm, True, cfg.run_timeout_s, text=True).failed:
        raise CostError(f"{target}: warmup requests failed")
    router_pids = process_tree(router_pid) if router_pid else []
    profiler = (Profiler.start(router_pid, Path(cfg.profile_dir) / f"router-{target}.txt", log_dir, True)
                if cfg.profile_dir and router_pid and target == "pdserve" else None)
    before = (CpuSnapshot.take(router_pids), CpuSnapshot.take([up.child.proc.pid]), system_busy_s())
    try:
        bench = run_bench(router_bench_argv(cfg, base_url, model, log_dir / f"bench_{target}.json"),
                          log_dir, f"bench-{target}", cfg.run_timeout_s)
    finally:
        after = (CpuSnapshot.take(router_pids), CpuSnapshot.take([up.child.proc.pid]), system_busy_s())
        profile = profiler.stop(cfg.profile_top_n) if profiler else None
    row = router_row(target, bench, after[0].since(before[0]), after[1].since(before[1]),
                     after[2] - before[2], after[1].at_s - before[1].at_s)
    if profile is not None:
        row["profile"] = profile
    return row


def router_row(target: str, bench: BenchRun, router_cpu_s: float, upstream_cpu_s: float,
               busy_cpu_s: float, window_s: float) -> dict[str, Any]:
    m = bench.metrics
    tokens = int(m["total_output_tokens"])
    return {
        "target": target, "output_tokens": tokens, "failed": m["failed"], "wall_s": m["duration_s"],
        "tokens_per_s": m["output_throughput"],
        "router_cpu_us_per_token": per_token_us(router_cpu_s, tokens) if target != "direct" else None,
        "upstream_cpu_us_per_token": per_token_us(upstream_cpu_s, tokens),
        "client_cpu_us_per_token": per_token_us(bench.client_cpu_s, tokens),
        "router_cores": router_cpu_s / window_s, "upstream_cores": upstream_cpu_s / window_s,
        "client_cores": bench.client_cpu_s / window_s, "machine_busy_cores": busy_cpu_s / window_s,
        "itl_p50_ms": stat_ms(m, "itl_ms"), "itl_p99_ms": stat_ms(m, "itl_ms", "p99"),
        "tpot_p50_ms": stat_ms(m, "tpot_ms"), "ttft_p50_ms": stat_ms(m, "ttft_ms"),
        "router_cpu_s": router_cpu_s, "upstream_cpu_s": upstream_cpu_s, "client_cpu_s": bench.client_cpu_s,
        "window_s": window_s,
    }


def run_one_target(cfg: RouterBenchConfig, target: str, up: Upstream, log_dir: Path) -> dict[str, Any]:
    port = free_port()
    argv = router_argv(target, port, up, cfg.policy)
    if argv is None:
        return measure_target(cfg, target, up.url, None, up, log_dir)
    with running(f"router-{target}", argv, log_dir) as router:
        base_url = f"http://127.0.0.1:{port}"
        wait_relaying(router, base_url, "fake-model", cfg.startup_timeout_s)
        return measure_target(cfg, target, base_url, router.proc.pid, up, log_dir)


def target_available(target: str) -> bool:
    if not target.startswith("sglang"):
        return True
    import importlib.util

    return importlib.util.find_spec("sglang_router") is not None


def add_comparisons(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_target = {r["target"]: r for r in rows}
    direct = by_target.get("direct")
    for row in rows:
        if direct and row["itl_p50_ms"] is not None and direct["itl_p50_ms"] is not None:
            row["added_itl_p50_ms"] = row["itl_p50_ms"] - direct["itl_p50_ms"]
            row["added_tpot_p50_ms"] = row["tpot_p50_ms"] - direct["tpot_p50_ms"]
    out: dict[str, Any] = {}
    for suffix in ("", "-pd"):
        ours, theirs = by_target.get("pdserve" + suffix), by_target.get("sglang" + suffix)
        if ours and theirs and ours["router_cpu_us_per_token"] and theirs["router_cpu_us_per_token"]:
            out[f"pdserve{suffix}_over_sglang{suffix}_cpu_per_token"] = (
                ours["router_cpu_us_per_token"] / theirs["router_cpu_us_per_token"])
    if "pdserve-pd" in by_target and "sglang" in by_target and by_target["sglang"]["router_cpu_us_per_token"]:
        out["pdserve-pd_over_sglang_cpu_per_token"] = (
            by_target["pdserve-pd"]["router_cpu_us_per_token"] / by_target["sglang"]["router_cpu_us_per_token"])
    return out


def run_router(cfg: RouterBenchConfig) -> dict[str, Any]:
    log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="serving_cost_router_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if cfg.profile_dir:
        Path(cfg.profile_dir).mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer is None:
        cfg = dataclasses.replace(cfg, tokenizer=builtin_tokenizer())
    port, prefill_port = free_port(), free_port()
    argv = python_module("pdserve.benchmarks.fake_upstream", "--port", str(port), "--prefill-port",
                         str(prefill_port), "--token-interval-ms", str(cfg.token_interval_ms))
    rows, skipped = [], []
    with running("fake-upstream", argv, log_dir) as fake:
        wait_healthy(fake, f"http://127.0.0.1:{port}/health", cfg.startup_timeout_s)
        up = Upstream(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prefill_port}", fake)
        for target in cfg.targets:
            if not target_available(target):
                log(f"skipping {target}: sglang_router is not installed (pip install sglang-router)")
                skipped.append(target)
                continue
            log(f"router: {target} run")
            rows.append(run_one_target(cfg, target, up, log_dir))
    return {"kind": "router", "config": asdict(cfg), "cpu_count": os.cpu_count(), "log_dir": str(log_dir),
            "runs": rows, "skipped": skipped, "comparison": add_comparisons(rows)}


def builtin_tokenizer() -> str | None:
    """The built-in tiny model's directory (it has a tokenizer), via the CLI."""
    try:
        out = subprocess.run(python_module("pdserve.cli", "model", "path", "tiny"), capture_output=True,
                             text=True, timeout=120, check=True)
    except (subprocess.SubprocessError, OSError):
        log("warning: no built-in tokenizer; pdserve bench will approximate prompt lengths")
        return None
    return out.stdout.strip().splitlines()[-1]


def router_table(doc: dict[str, Any]) -> str:
    w, c = doc["config"]["workload"], doc["config"]
    header = ["target", "tokens", "tok/s", "router us/tok", "upstream us/tok", "client us/tok",
              "router cores", "busy cores", "ITL p50", "ITL p99", "TPOT p50", "added ITL p50"]
    rows = [[r["target"], str(r["output_tokens"]), num(r["tokens_per_s"], 0), num(r["router_cpu_us_per_token"]),
             num(r["upstream_cpu_us_per_token"]), num(r["client_cpu_us_per_token"]), num(r["router_cores"], 2),
             num(r["machine_busy_cores"], 2), num(r["itl_p50_ms"], 3), num(r["itl_p99_ms"], 3),
             num(r["tpot_p50_ms"], 3), num(r.get("added_itl_p50_ms"), 3)] for r in doc["runs"]]
    title = (f"router relay cost: c={w['concurrency']} out={w['output_len']} prompts={w['num_prompts']} "
             f"token interval {c['token_interval_ms']:g} ms, policy {c['policy']} ({doc['cpu_count']} cores); "
             "latencies in ms")
    ratios = [f"{k}: {v:.2f}" for k, v in doc["comparison"].items()]
    return "\n".join([title, align(rows, header), *ratios])


# --------------------------------------------------------------------------- CLI


def add_workload_args(p: argparse.ArgumentParser) -> None:
    d = Workload()
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight")
    p.add_argument("--input-len", type=int, default=d.input_len, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=d.output_len, help="output tokens per request (ignore_eos)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts, help="requests per run")
    p.add_argument("--seed", type=int, default=d.seed)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-json", help="write every figure to this file")
    p.add_argument("--log-dir", help="child logs and bench JSONs (default: a new temp dir)")
    p.add_argument("--run-timeout-s", type=float, default=900.0, help="limit of one measured run")
    p.add_argument("--profile-dir", help="also record py-spy profiles (raw collapsed stacks) here")
    p.add_argument("--profile-top-n", type=int, default=25, help="functions listed per profile table")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.serving_cost",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    front = sub.add_parser("front", help="CPU per token of one instance's front and engine",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_workload_args(front)
    add_common_args(front)
    front.add_argument("--modes", nargs="+", choices=("stream", "no-stream"), default=["stream", "no-stream"])
    front.add_argument("--engine-mark", default=ENGINE_CMDLINE_MARK,
                       help="a child of serve whose command line holds this is the engine")
    front.add_argument("--startup-timeout-s", type=float, default=600.0)
    front.add_argument("server_args", nargs="*", help="extra `pdserve serve` flags, after --")
    router = sub.add_parser("router", help="CPU per relayed token of pdserve router vs sglang-router",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_workload_args(router)
    add_common_args(router)
    router.add_argument("--targets", nargs="+", choices=ROUTER_TARGETS, default=list(DEFAULT_ROUTER_TARGETS),
                        help="direct: no router (baseline); *-pd: the fake plays prefill and decode")
    router.add_argument("--token-interval-ms", type=float, default=2.0, help="the fake upstream's token pace")
    router.add_argument("--policy", default="cache_aware", help="routing policy of both routers")
    router.add_argument("--tokenizer", help="for pdserve bench's text prompts (default: built-in tiny)")
    router.add_argument("--startup-timeout-s", type=float, default=120.0)
    return p


def workload_of(a: argparse.Namespace) -> Workload:
    return Workload(a.input_len, a.output_len, a.num_prompts, a.concurrency, a.seed)


def front_config(a: argparse.Namespace) -> FrontConfig:
    return FrontConfig(workload_of(a), tuple(a.modes), tuple(a.server_args), a.engine_mark, a.startup_timeout_s,
                       a.run_timeout_s, a.profile_dir, a.profile_top_n, a.output_json, a.log_dir)


def router_config(a: argparse.Namespace) -> RouterBenchConfig:
    return RouterBenchConfig(workload_of(a), tuple(a.targets), a.token_interval_ms, a.policy, a.tokenizer,
                             a.startup_timeout_s, a.run_timeout_s, a.profile_dir, a.profile_top_n,
                             a.output_json, a.log_dir)


def print_report(doc: dict[str, Any]) -> None:
    print(front_table(doc) if doc["kind"] == "front" else router_table(doc))
    for row in doc["runs"]:
        if "profile" in row:
            name = row.get("mode") or row.get("target")
            print("\n" + profile_table(row["profile"], f"py-spy profile ({doc['kind']} {name})"))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        with terminate_on_sigterm():
            if a.command == "front":
                cfg = front_config(a)
                doc = run_front(cfg)
            else:
                cfg = router_config(a)
                doc = run_router(cfg)
    except CostError as exc:
        log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; children stopped")
        return 130
    write_json(cfg.output_json, doc)
    print_report(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
