"""``benchmarks/router_tree.py``: times the cache-aware policy's tree per routed
request below and at its bound, and keeps the worker's share within it."""

from __future__ import annotations

import json
from pathlib import Path

from pdserve.benchmarks import router_tree


def test_a_small_run_reaches_the_bound_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "tree.json"
    argv = ["--text-chars", "50", "--max-tree-chars", "1000", "--requests-at-bound", "30", "--output-json", str(out)]
    assert router_tree.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "python -m pdserve.benchmarks.router_tree " + " ".join(argv)
    assert result["requests_below_bound"] == 19
    assert 1000 - 50 < result["tenant_chars"] <= 1000  # at the bound, and within it
    assert result["us_per_request_below_bound"] > 0 and result["us_per_request_at_bound"] > 0
