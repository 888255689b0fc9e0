"""Schema-driven fuzzing: every operation of the instance's and the router's OpenAPI
schema, with bodies that follow the schema and bodies that break it, gets no 5xx.

Bounded and deterministic: a fixed number of examples per operation and mode,
derandomized, no example database. The instance runs with a short context so
that generated requests stay cheap.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pdserve.tests.support.router_process import RouterProcess, router_served
from pdserve.tests.support.server_process import ServerProcess, server_fixture

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

FLAGS = ("--page-size", "4", "--context-length", "128", "--max-total-tokens", "4096", "--enable-metrics")
MAX_EXAMPLES = 10
REQUEST_TIMEOUT_S = 60.0
BUDGET_S = 120.0  # a bound on the whole run, far above what it takes


fuzzed_server = server_fixture(FLAGS, "fuzzed.log")


@pytest.fixture(scope="module")
def fuzzed_router(fuzzed_server: ServerProcess, server_logs: Path) -> Iterator[RouterProcess]:
    flags = ["--worker", fuzzed_server.url, "--health-check-interval-s", "0.5", "--max-concurrent-requests", "8"]
    with router_served(flags, server_logs / "fuzzed-router.log") as router:
        yield router


def _runner(operation, mode, base_url: str, failures: list[str], calls: list[int]):
    """One operation in one generation mode, as a bounded, derandomized hypothesis test."""
    label = f"{operation.label} ({mode.value})"

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        calls[0] += 1
        response = case.call(base_url=base_url, timeout=REQUEST_TIMEOUT_S)
        if response.status_code >= 500:
            failures.append(f"{label}: {response.status_code} {response.text[:200]} "
                            f"for {case.as_curl_command()[:300]}")

    return run


def _fuzz(base_url: str) -> tuple[list[str], int]:
    """Run every operation in both generation modes; the 5xx answers, and how many calls."""
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    failures: list[str] = []
    calls = [0]
    for result in schema.get_all_operations():
        for mode in schemathesis.GenerationMode:
            try:
                _runner(result.ok(), mode, base_url, failures, calls)()
            except Unsatisfiable:
                pass  # nothing to break in this operation (no parameters, no body): negative mode has no case
    return failures, calls[0]


def _check(base_url: str, logs: list[str]) -> None:
    start = time.monotonic()
    failures, calls = _fuzz(base_url)
    elapsed_s = time.monotonic() - start
    assert not failures, "\n".join(failures)
    assert calls >= 2 * MAX_EXAMPLES, calls  # it really ran
    assert elapsed_s < BUDGET_S, f"{calls} calls took {elapsed_s:.0f} s"
    print(f"schemathesis on {base_url}: {calls} calls, no 5xx, {elapsed_s:.1f} s")
    for log in logs:
        assert "Traceback" not in log, log[-6000:]


def test_instance_schema_finds_no_5xx(fuzzed_server: ServerProcess) -> None:
    _check(fuzzed_server.url, [fuzzed_server.log_text()])


def test_router_schema_finds_no_5xx(fuzzed_server: ServerProcess, fuzzed_router: RouterProcess) -> None:
    _check(fuzzed_router.url, [fuzzed_router.log_text(), fuzzed_server.log_text()])
