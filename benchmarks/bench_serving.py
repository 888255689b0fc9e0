"""``pdserve bench``: TTFT/ITL/throughput benchmark against any OpenAI-compatible server.

Runs one benchmark per (traffic scenario, request rate, max concurrency) in the
cross product of the values given, prints a table per run (and a summary for a
sweep), and optionally writes JSON and a latency-percentile plot. Metric
definitions are in ``benchmarks/metrics.py``.

Example::

    pdserve bench --base-url http://127.0.0.1:30000 --backend openai \\
        --traffic-scenario "D(2048,256)" --request-rate 1 2 4 --num-prompts 200 \\
        --slo ttft_ms=1000,itl_ms=25 --output-json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pdserve.benchmarks.arrivals import arrival_offsets_s
from pdserve.benchmarks.backends import BACKENDS, RequestOptions
from pdserve.benchmarks.bench_tokenizer import (
    ApproxTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)
from pdserve.benchmarks.datasets import (
    DATASETS,
    BenchRequest,
    DatasetSpec,
    build_dataset,
    length_summary,
)
from pdserve.benchmarks.metrics import parse_slo
from pdserve.benchmarks.runner import BenchError, RunPoint, RunResult, run_point, warm_up
from pdserve.benchmarks.scenarios import ScenarioError, parse_scenario
from pdserve.common import env
from pdserve.common.args import add_dataclass_args, config_from_args, flag
from pdserve.common.startup import flag_error

if TYPE_CHECKING:
    import aiohttp
    from pdserve.benchmarks.client import Sender

KEEPALIVE_TIMEOUT_S = 4.0  # below uvicorn's default keep-alive of 5 s


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("request rate must be positive (inf: all at once)")
    return value


def _concurrency(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("max concurrency must be >= 1")
    return value


_ROUTES = "openai: /v1/completions, openai-chat: /v1/chat/completions, pdserve: /generate"


@dataclass(frozen=True)
class BenchConfig:
    base_url: str = field(default="http://127.0.0.1:30000", metadata=flag("server root URL, without /v1"))
    model: str | None = field(default=None, metadata=flag("model name (default: first of GET /v1/models)"))
    api_key: str | None = field(default=None, metadata=flag("bearer token (default: $OPENAI_API_KEY)"))
    backend: str = field(default="openai", metadata=flag(_ROUTES))
    dataset: str = field(default="random", metadata=flag("prompt source"))
    dataset_path: str | None = field(default=None, metadata=flag("ShareGPT JSON file"))
    num_prompts: int = field(default=100, metadata=flag("requests per run"))
    random_input_len: int = field(default=1024, metadata=flag("prompt tokens"))
    random_output_len: int = field(default=128, metadata=flag(
        "output tokens (max_tokens); also the shared-prefix output length"))
    random_range_ratio: float = field(default=0.0, metadata=flag("lengths uniform in [len*(1-r), len*(1+r)]"))
    shared_prefix_num_groups: int = field(default=4, metadata=flag("distinct shared prefixes"))
    shared_prefix_len: int = field(default=1024, metadata=flag("tokens of each group's shared system prefix"))
    shared_prefix_suffix_len: int = field(default=64, metadata=flag("tokens of each prompt's own suffix"))
    sharegpt_output_len: int | None = field(default=None, metadata=flag(
        "output length for ShareGPT prompts (default: the reply's)"))
    traffic_scenarios: tuple[str, ...] = field(default=(), metadata=flag(
        "D(in,out) | N(mi,si)/(mo,so) | U(lo,hi)/(lo,hi); one run each (default: none)",
        flag="--traffic-scenario", action="extend", nargs="+", metavar="SCENARIO"))
    request_rates: tuple[float, ...] = field(default=(math.inf,), metadata=flag(
        "requests/s, gamma arrivals (inf: all at once); one run each",
        flag="--request-rate", action="extend", nargs="+", type=_rate, metavar="RATE"))
    burstiness: float = field(default=1.0, metadata=flag("gamma shape of inter-arrival gaps; 1 is Poisson, < 1 burstier"))
    max_concurrency: tuple[int | None, ...] = field(default=(None,), metadata=flag(
        "most requests in flight; one run each (default: unlimited)",
        action="extend", nargs="+", type=_concurrency, metavar="N"))
    warmup_requests: int = field(default=1, metadata=flag("requests sent before each run and left out of its metrics"))
    seed: int = field(default=0, metadata=flag("seed of prompts and arrival times"))
    ignore_eos: bool = field(default=False, metadata=flag("send ignore_eos: true"))
    temperature: float = field(default=0.0, metadata=flag("sampling temperature"))
    tokenizer: str | None = field(default=None, metadata=flag(
        "HF tokenizer directory (default: the server's /get_model_info paths)"))
    slo: str | None = field(default=None, metadata=flag(
        "e.g. ttft_ms=1000,itl_ms=25 (keys: ttft_ms, itl_ms, tpot_ms, e2e_ms) for goodput and SLO attainment"))
    output_json: str | None = field(default=None, metadata=flag("write results to this file"))
    output_details: bool = field(default=False, metadata=flag("every request in the JSON"))
    plot: str | None = field(default=None, metadata=flag("PNG of TTFT/ITL p50/p99 over the sweep"))
    timing: bool = field(default=False, metadata=flag(
        "ask every request for its journey (return_timing) and print the mean time per phase per run"))
    timing_plot: str | None = field(default=None, metadata=flag(
        "with --timing: PNG of the phases as stacked bars, one per run (needs matplotlib)"))
    request_timeout_s: float = field(default=600.0, metadata=flag("a request not finished by then counts as failed"))
    disable_tqdm: bool = field(default=False, metadata=flag("no progress bar"))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _get_json(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> dict[str, Any] | None:
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except Exception:  # noqa: BLE001 - any failure means "the server does not say"
        return None


async def resolve_model(session: aiohttp.ClientSession, cfg: BenchConfig, headers: dict[str, str]) -> str | None:
    """``--model``, else the first id of ``GET /v1/models`` (optional for ``pdserve``)."""
    if cfg.model is not None:
        return cfg.model
    listing = await _get_json(session, cfg.base_url.rstrip("/") + "/v1/models", headers)
    models = (listing or {}).get("data") or []
    if models:
        return str(models[0]["id"])
    if cfg.backend == "pdserve":
        return None
    raise BenchError(f"cannot list models at {cfg.base_url}/v1/models; pass --model")


async def resolve_tokenizer(session: aiohttp.ClientSession, cfg: BenchConfig, headers: dict[str, str]) -> Tokenizer:
    """``--tokenizer``, else the server's ``/get_model_info`` path, else the approximation."""
    if cfg.tokenizer is not None:
        return HFTokenizer.load(cfg.tokenizer)
    info = await _get_json(session, cfg.base_url.rstrip("/") + "/get_model_info", headers) or {}
    for key in ("tokenizer_path", "model_path"):
        tokenizer = load_tokenizer(info.get(key))
        if tokenizer.exact:
            return tokenizer
    _log("warning: no tokenizer (pass --tokenizer DIR); token counts missing from the server's "
         "usage are estimated by counting words, and random prompt lengths are approximate")
    return ApproxTokenizer()


def dataset_spec(cfg: BenchConfig, scenario: str | None) -> DatasetSpec:
    return DatasetSpec(
        name=cfg.dataset,
        path=cfg.dataset_path,
        num_prompts=cfg.num_prompts,
        random_input_len=cfg.random_input_len,
        random_output_len=cfg.random_output_len,
        random_range_ratio=cfg.random_range_ratio,
        scenario=parse_scenario(scenario) if scenario else None,
        shared_prefix_num_groups=cfg.shared_prefix_num_groups,
        shared_prefix_len=cfg.shared_prefix_len,
        shared_prefix_suffix_len=cfg.shared_prefix_suffix_len,
        sharegpt_output_len=cfg.sharegpt_output_len,
    )


def _headers(cfg: BenchConfig) -> dict[str, str]:
    key = cfg.api_key or env.OPENAI_API_KEY.get()
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class BenchOutcome:
    results: list[RunResult]  # one per run
    model: str | None
    tokenizer: str
    tokenizer_exact: bool


async def _run_scenario(
    sender: Sender, cfg: BenchConfig, scenario: str | None, requests: list[BenchRequest]
) -> list[RunResult]:
    slo = parse_slo(cfg.slo)
    results = []
    for rate in cfg.request_rates:
        for conc in cfg.max_concurrency:
            point = RunPoint(scenario or cfg.dataset, rate, conc)
            await warm_up(sender, requests, cfg.warmup_requests)
            offsets = arrival_offsets_s(len(requests), rate, cfg.burstiness, np.random.default_rng(cfg.seed))
            result = await run_point(sender, requests, offsets, point, slo, cfg.disable_tqdm)
            results.append(dataclasses.replace(result, lengths=length_summary(requests)))
    return results


async def run_benchmark(cfg: BenchConfig) -> BenchOutcome:
    """Every run of ``cfg`` against its server; the Python entry point of ``pdserve bench``."""
    # aiohttp is needed only to run, so `pdserve bench --help` works without it.
    import aiohttp
    from pdserve.benchmarks import client

    headers = _headers(cfg)
    # limit=0: the default pool of 100 would cap concurrency. An idle connection
    # is dropped after 4 s, before servers close theirs (uvicorn: 5 s): building a
    # large dataset blocks the loop for seconds, and a connection the server
    # closed meanwhile would fail the first request with "Server disconnected".
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_TIMEOUT_S)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, read_bufsize=client.READ_BUFSIZE_BYTES
    ) as session:
        model = await resolve_model(session, cfg, headers)
        tokenizer = await resolve_tokenizer(session, cfg, headers)
        options = RequestOptions(model=model, ignore_eos=cfg.ignore_eos, temperature=cfg.temperature,
                                 return_timing=cfg.timing)
        sender = client.Sender(session, cfg.base_url, BACKENDS.get(cfg.backend), options, tokenizer,
                               cfg.request_timeout_s, headers)
        results: list[RunResult] = []
        for scenario in cfg.traffic_scenarios or (None,):
            requests = build_dataset(dataset_spec(cfg, scenario), tokenizer, cfg.seed)
            results += await _run_scenario(sender, cfg, scenario, requests)
    return BenchOutcome(results, model, tokenizer.name, tokenizer.exact)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve bench", description=__doc__.split("\n\n")[0].replace("``", ""))
    add_dataclass_args(parser, BenchConfig, choices={"backend": BACKENDS.names(), "dataset": DATASETS.names()})
    return parser


def config_from_argv(argv: list[str]) -> BenchConfig:
    parser = build_parser()
    cfg = config_from_args(BenchConfig, parser.parse_args(argv))
    try:
        validate(cfg)
    except ValueError as exc:
        flag_error(parser.prog, str(exc))
    return cfg


def validate(cfg: BenchConfig) -> None:
    for text in cfg.traffic_scenarios:
        try:
            parse_scenario(text)
        except ScenarioError as exc:
            raise ValueError(str(exc)) from None
    parse_slo(cfg.slo)
    if cfg.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if cfg.burstiness <= 0:
        raise ValueError("--burstiness must be positive")
    if cfg.request_timeout_s <= 0:
        raise ValueError("--request-timeout-s must be positive")
    if cfg.base_url.rstrip("/").endswith("/v1"):
        raise ValueError(f"--base-url {cfg.base_url} ends in /v1: drop the /v1 and give the server's root "
                         f"({cfg.base_url.rstrip('/').removesuffix('/v1')}); the backend adds its own path")
    if cfg.timing_plot and not cfg.timing:
        raise ValueError("--timing-plot needs --timing")
    if cfg.backend == "openai-chat" and cfg.dataset == "random-ids":
        raise ValueError("--backend openai-chat sends text; use --dataset random")


def write_report(cfg: BenchConfig, outcome: BenchOutcome) -> None:
    """Tables on stdout; JSON and plot files as asked."""
    from pdserve.benchmarks import plot, report, timing

    for result in outcome.results:
        print(report.run_table(result) + "\n")
    if len(outcome.results) > 1:
        print(report.summary_table(outcome.results))
    journeys = timing.breakdowns(outcome.results) if cfg.timing else []
    if cfg.timing:
        print("\n" + timing.timing_table(journeys))
    if cfg.output_json:
        config = {**dataclasses.asdict(cfg), "model": outcome.model, "tokenizer": outcome.tokenizer,
                  "tokenizer_exact": outcome.tokenizer_exact,
                  "api_key": "<redacted>" if cfg.api_key else None}
        doc = report.bench_json(config, outcome.results, cfg.output_details)
        if cfg.timing:
            doc["timing"] = [b.to_dict() for b in journeys]
        with open(cfg.output_json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        _log(f"wrote {cfg.output_json}")
    if cfg.plot and plot.plot_available():
        if plot.plot_sweep(outcome.results, cfg.plot):
            _log(f"wrote {cfg.plot}")
        else:
            _log("no plot: a sweep over finite request rates or concurrency limits is needed")
    if cfg.timing_plot and journeys and plot.plot_available():
        timing.plot_timing(journeys, cfg.timing_plot)
        _log(f"wrote {cfg.timing_plot}")


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv))
    from pdserve.benchmarks import plot

    if (cfg.plot or cfg.timing_plot) and not plot.plot_available():
        _log(f"warning: {plot.MISSING_MATPLOTLIB}")
    try:
        outcome = asyncio.run(run_benchmark(cfg))
    except (BenchError, ValueError, OSError) as exc:
        _log(f"pdserve bench: error: {exc}")
        return 1
    write_report(cfg, outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
