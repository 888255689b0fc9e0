"""KV transfer microbenchmark: one room per prompt length, P and D in two processes.

For prompts of ``--min-tokens``..``--max-tokens`` tokens (powers of two) it
writes the prompt's pages of every layer from a prefill agent into a decode
agent and reports, per backend and length: bytes moved, descriptors per room,
the time from posting the WRITE to the decode side seeing the room done, the
achieved bytes/s, and that rate as a fraction of a same-device copy of the same
size measured in the prefill process (device-to-device on cuda, memcpy on cpu).

    python -m pdserve.benchmarks.transfer_bench --backend nixl ucx --output-json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pdserve.common.args import add_dataclass_args, config_from_args, flag
from pdserve.common.kv_layout import KVLayout
from pdserve.model.config import ModelConfig
from pdserve.transfer.base import TRANSFER_BACKENDS, RoomState
from pdserve.transfer.harness import AgentProcess, WorkerSpec, start_agents

_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class TransferBenchConfig:
    model_config: str = field(default="benchmarks/configs/llama-3.2-1b.json", metadata=flag(
        "Hugging Face config.json for the KV shape"))
    page_size: int = field(default=16, metadata=flag("tokens per KV page"))
    device: str = field(default="cpu", metadata=flag("where both KV pools live", choices=("cpu", "cuda")))
    backends: tuple[str, ...] = field(default=("nixl", "ucx"), metadata=flag(
        "transfer backends to time, one after another", flag="--backend", nargs="+"))
    min_tokens: int = field(default=128, metadata=flag("shortest prompt; lengths double up to --max-tokens"))
    max_tokens: int = field(default=8192, metadata=flag("longest prompt"))
    num_layers: int | None = field(default=None, metadata=flag(
        "override the model's layer count, to save memory (default: the model's)"))
    repeats: int = field(default=5, metadata=flag("timed rooms per length; the median is reported"))
    scatter: bool = field(default=False, metadata=flag("scatter destination pages (no merging)"))
    timeout_s: float = field(default=120.0, metadata=flag("seconds a room may take before it counts as failed"))
    verify: bool = field(default=False, metadata=flag("check the destination pages after each length"))
    output_json: str | None = field(default=None, metadata=flag(
        "write config, layout and rows to this file (default: the table only)"))


@dataclass(frozen=True)
class BenchRow:
    backend: str
    num_tokens: int
    num_pages: int
    num_bytes: int
    descriptors_per_room: int
    time_s: float  # median over repeats
    bytes_per_s: float
    copy_bytes_per_s: float
    copy_fraction: float
    times_s: list[float] = field(default_factory=list)
    verified: bool | None = None


def load_layout(cfg: TransferBenchConfig) -> KVLayout:
    path = Path(cfg.model_config)
    if not path.exists() and (_CONFIG_DIR / path.name).exists():
        path = _CONFIG_DIR / path.name  # run from outside the repository root
    model = ModelConfig.from_dict(json.loads(path.read_text()))
    dtype = model.torch_dtype.removeprefix("torch.")
    return KVLayout(
        num_layers=cfg.num_layers or model.num_layers,
        num_pages=math.ceil(cfg.max_tokens / cfg.page_size),
        page_size=cfg.page_size,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        dtype=dtype if dtype in ("float32", "float16", "bfloat16") else "bfloat16",
    )


def prompt_lengths(cfg: TransferBenchConfig) -> list[int]:
    lengths, n = [], cfg.min_tokens
    while n <= cfg.max_tokens:
        lengths.append(n)
        n *= 2
    return lengths


def _one_room(p: AgentProcess, d: AgentProcess, names: tuple[str, str], src: list[int], dst: list[int],
              timeout_s: float) -> tuple[float, int]:
    """Seconds from P posting the WRITE to D seeing the room done; descriptors."""
    p_name, d_name = names
    room = random.getrandbits(63)
    d.call("open_receiver", room=room, peer=p_name)
    p.call("open_sender", room=room, peer=d_name, dst_pages=dst)
    d.submit("wait", rooms=[room], timeout_s=timeout_s)
    started = p.call("send", room=room, src_pages=src, dst_start=0, is_last=True)
    p_state, _ = p.call("wait", rooms=[room], timeout_s=timeout_s)[room]
    d_state, done_at = d.result(timeout_s + 30)[room]
    if (p_state, d_state) != (RoomState.SUCCESS, RoomState.SUCCESS):
        raise RuntimeError(f"room failed: prefill {RoomState(p_state).name}, decode {RoomState(d_state).name}")
    return done_at - started, p.call("counters", room=room)[0]


def _same_pages(p: AgentProcess, d: AgentProcess, src: list[int], dst: list[int]) -> bool:
    import numpy as np

    return bool(np.array_equal(p.call("page_sums", pages=src), d.call("page_sums", pages=dst)))


def bench_backend(cfg: TransferBenchConfig, layout: KVLayout, backend: str) -> list[BenchRow]:
    specs = [WorkerSpec(backend, name, layout.to_dict(), cfg.timeout_s, cfg.device) for name in ("P", "D")]
    p, d = start_agents(specs)
    try:
        p_name = d.call("add_peer", info=p.call("info"))
        d_name = p.call("add_peer", info=d.call("info"))
        if cfg.verify:
            p.call("fill")
            d.call("fill", sentinel=-1.0)
        rows = []
        for num_tokens in prompt_lengths(cfg):
            num_pages = math.ceil(num_tokens / cfg.page_size)
            src = list(range(num_pages))
            dst = random.Random(num_tokens).sample(range(layout.num_pages), num_pages) if cfg.scatter else src
            num_bytes = num_pages * layout.page_bytes * layout.num_regions
            _one_room(p, d, (p_name, d_name), src, dst, cfg.timeout_s)  # warm-up
            runs = [_one_room(p, d, (p_name, d_name), src, dst, cfg.timeout_s) for _ in range(cfg.repeats)]
            times = [t for t, _ in runs]
            median = statistics.median(times)
            copy_bw = p.call("copy_bandwidth", num_bytes=num_bytes)
            verified = _same_pages(p, d, src, dst) if cfg.verify else None
            rows.append(BenchRow(backend, num_tokens, num_pages, num_bytes, runs[0][1], median,
                                 num_bytes / median, copy_bw, num_bytes / median / copy_bw, times, verified))
        return rows
    finally:
        p.close()
        d.close()


def format_table(rows: list[BenchRow], device: str) -> str:
    ref = "d2d copy" if device == "cuda" else "memcpy"
    lines = [f"{'backend':<8}{'tokens':>8}{'bytes':>14}{'descs':>7}{'time ms':>10}{'GB/s':>9}"
             f"{'of ' + ref:>14}{'verified':>10}"]
    for r in rows:
        verified = "-" if r.verified is None else ("yes" if r.verified else "NO")
        lines.append(
            f"{r.backend:<8}{r.num_tokens:>8}{r.num_bytes:>14,}{r.descriptors_per_room:>7}"
            f"{r.time_s * 1e3:>10.3f}{r.bytes_per_s / 1e9:>9.2f}{r.copy_fraction:>14.1%}{verified:>10}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="transfer_bench", description=__doc__.split("\n")[0])
    add_dataclass_args(ap, TransferBenchConfig, choices={"backends": TRANSFER_BACKENDS.names()})
    return ap


def parse_args(argv: list[str]) -> TransferBenchConfig:
    ap = build_parser()
    cfg = config_from_args(TransferBenchConfig, ap.parse_args(argv))
    if cfg.min_tokens < 1 or cfg.max_tokens < cfg.min_tokens or cfg.page_size < 1 or cfg.repeats < 1:
        ap.error("need 1 <= --min-tokens <= --max-tokens, --page-size >= 1, --repeats >= 1")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    layout = load_layout(cfg)
    print(f"layout: {layout}  ({layout.total_bytes / 2**20:.0f} MiB per side)", flush=True)
    rows: list[BenchRow] = []
    for backend in cfg.backends:
        rows += bench_backend(cfg, layout, backend)
    print(format_table(rows, cfg.device))
    if any(r.verified is False for r in rows):
        print("destination pages differ from the source pages", file=sys.stderr)
        return 1
    if cfg.output_json:
        payload = {"config": asdict(cfg), "layout": layout.to_dict(), "rows": [asdict(r) for r in rows]}
        Path(cfg.output_json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
