"""The cache-aware router's prefix tree, per routed request, below and at its bound.

Every request the ``cache_aware`` policy routes is inserted into the chosen
worker's share of the tree, and once that share reaches
``--max-tree-chars`` (SGLang's default: 4M characters) every request also
evicts the worker's least recently used leaves. This times insert + evict per
request for distinct random texts, first while the share grows to the bound,
then for as many requests again at the bound.

    python -m pdserve.benchmarks.router_tree --output-json router-tree.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pdserve.common.args import add_dataclass_args, config_from_args, flag
from pdserve.router.radix_tree import RadixTree

TENANT = "http://worker-0"


@dataclass(frozen=True)
class RouterTreeConfig:
    text_chars: int = field(default=2000, metadata=flag("characters of each request's text"))
    max_tree_chars: int = field(default=4_000_000, metadata=flag("the worker's bound (the router's --max-tree-chars)"))
    requests_at_bound: int = field(default=4000, metadata=flag("requests timed once the bound is reached"))
    seed: int = field(default=0, metadata=flag("seed of the texts"))
    output_json: str | None = field(default=None, metadata=flag("write the figures here (default: print only)"))


def _route(tree: RadixTree, texts: list[str], max_chars: int) -> float:
    """Mean µs per request of what ``CacheAware.select`` does to the tree."""
    start = time.perf_counter()
    for text in texts:
        tree.insert(text, TENANT)
        tree.evict(TENANT, max_chars)
    return (time.perf_counter() - start) / len(texts) * 1e6


def measure(cfg: RouterTreeConfig) -> dict:
    rng = random.Random(cfg.seed)
    alphabet = string.ascii_letters + " "
    below = cfg.max_tree_chars // cfg.text_chars - 1  # requests that fit under the bound
    texts = ["".join(rng.choices(alphabet, k=cfg.text_chars)) for _ in range(below + cfg.requests_at_bound)]
    tree = RadixTree()
    below_us = _route(tree, texts[:below], cfg.max_tree_chars)
    at_bound_us = _route(tree, texts[below:], cfg.max_tree_chars)
    return {"config": asdict(cfg), "requests_below_bound": below, "us_per_request_below_bound": below_us,
            "us_per_request_at_bound": at_bound_us, "tenant_chars": tree.tenant_chars(TENANT)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.router_tree",
                                     description="The cache-aware router's prefix tree, per routed request.")
    add_dataclass_args(parser, RouterTreeConfig)
    cfg = config_from_args(RouterTreeConfig, parser.parse_args(argv))
    result = measure(cfg)
    result.update(command="python -m pdserve.benchmarks.router_tree " + " ".join(sys.argv[1:] if argv is None else argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine={"cpu": platform.processor() or platform.machine(), "python": platform.python_version()})
    print(f"router tree: {result['us_per_request_below_bound']:.1f} us per request below the bound "
          f"({result['requests_below_bound']} requests), {result['us_per_request_at_bound']:.1f} us at it "
          f"({cfg.requests_at_bound} requests)")
    if cfg.output_json:
        Path(cfg.output_json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
