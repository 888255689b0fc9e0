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
    chunk on a fixed schedule) and puts each router in front of it in turn:
    ``pdserve router`` (colocated, and PD with the fake playing both prefill
    and decode), SGLang's Rust ``sglang-router``, and no router at all (the
    baseline). For each it reports the router's CPU per relayed token (its
    whole process tree), ITL and TPOT p50 through it, and the ITL p50 it adds
    over the baseline. A constant relay time cancels out of ITL, so a probe
    stream also times every token from the fake's write (a CLOCK_MONOTONIC
    stamp in the chunk) to its arrival: the delivery delay, and the delay a
    router adds over the baseline. The default pace (64 streams, 10 ms per
    token: 6,400 tokens/s offered) keeps ``pdserve bench``, a Python client,
    below saturation on 2 cores; at 2 ms the client itself falls behind,
    reads several chunks at once, and ITL stops describing the router.

CPU per token is the quotable figure: it depends far less than latency on what
else runs (the engine's torch threads excepted: they spin when starved). Each
row also reports ``other_cores``, the CPU the rest of the machine used during
the run (``/proc/stat`` busy time minus every measured process), and
``--wait-idle-s`` holds each run until the machine is quiet.

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
import sys

from pdserve.benchmarks.serving.config import FrontConfig, RouterBenchConfig
from pdserve.benchmarks.serving.front import run_front
from pdserve.benchmarks.serving.procs import run_guarded
from pdserve.benchmarks.serving.report import print_report, write_json
from pdserve.benchmarks.serving.router import run_router
from pdserve.common.args import Subcommand, chosen_subcommand, subcommand_parser
from pdserve.common.registry import Registry

COMMANDS: Registry[Subcommand] = Registry("measurement", {
    "front": Subcommand(FrontConfig, run_front, "CPU per token of one instance's front and engine"),
    "router": Subcommand(RouterBenchConfig, run_router, "CPU per relayed token of pdserve router vs sglang-router"),
})


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per measurement, each built from its config dataclass."""
    return subcommand_parser("python -m pdserve.benchmarks.serving_cost", __doc__.split("\n\n")[0], COMMANDS)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    command, cfg = chosen_subcommand(COMMANDS, ns)
    doc, status = run_guarded(lambda: command.run(cfg))
    if doc is None:
        return status
    write_json(cfg.output_json, doc)
    print_report(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
