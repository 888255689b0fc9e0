"""Shared fixtures: the built-in model, its transformers oracle, served instances,
and a router with fake instances (``stack``).

Server processes are expensive (seconds to start), so the two general-purpose
instances live for the whole session and each special-flag instance for one
module. After every test that used a server, that server's KV pool must be
back to zero pages in use: a leaked page is a bug wherever it comes from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pdserve.tests.support.hf_oracle import HFOracle
from pdserve.tests.support.server_process import ServerProcess, server_fixture

if TYPE_CHECKING:  # the router's imports (a second) only for the tests that use a stack
    from pdserve.tests.support.router_stack import Stack

# Page size 4 and chunk 16 make short test prompts cross page and chunk borders.
MAIN_FLAGS = ("--page-size", "4", "--chunked-prefill-size", "16", "--enable-metrics", "--max-total-tokens", "8192")
# A short context makes over-long prompts cheap; no radix cache, no metrics.
SMALL_FLAGS = (
    "--page-size", "4", "--context-length", "64", "--allow-auto-truncate",
    "--disable-radix-cache", "--max-total-tokens", "1024",
)
IDLE_TIMEOUT_S = 5.0


@pytest.fixture(scope="session")
def model_dir() -> str:
    from pdserve.model.builtin import ensure_builtin_model

    return ensure_builtin_model("tiny")


@pytest.fixture(scope="session")
def oracle(model_dir: str) -> HFOracle:
    return HFOracle(model_dir)


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


main_server = server_fixture(MAIN_FLAGS, "main.log", scope="session")
small_server = server_fixture(SMALL_FLAGS, "small.log", scope="session")


@pytest.fixture
def stack() -> Iterator[Stack]:
    """A router and fake instances in threads (:mod:`.support.router_stack`), stopped after the test."""
    from pdserve.tests.support.router_stack import Stack

    s = Stack()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(autouse=True)
def pool_returns_empty(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, every server it used holds no KV pages and no requests."""
    names = [n for n in request.fixturenames if n.endswith("server")]  # fixture naming convention
    servers = [s for n in names if isinstance(s := request.getfixturevalue(n), ServerProcess)]
    yield
    for server in servers:
        if not server.alive():
            continue
        info = server.wait_idle(IDLE_TIMEOUT_S)
        assert info["kv_pool"]["used_pages"] == 0, f"pages leaked on {server.flags}: {info['kv_pool']}"
        assert info["num_running_reqs"] == 0 and info["num_queued_reqs"] == 0, info
