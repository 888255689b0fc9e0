"""A prefill backlog longer than the rooms' timeout fails no room.

The prefill instance takes 16 prompt tokens a step, so a burst of long prompts
waits in its queue for several times ``--disaggregation-timeout-s``. Each room's
deadline would pass on both sides while it waits; the prefill side names the
rooms still queued or prefilling to their decode side (``RoomsInPrefill``) every
quarter of the timeout, and both sides start the deadline over.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import httpx
import pytest
from pdserve.launcher import Cluster
from pdserve.tests.support.clusters import local_cluster_config
from pdserve.tests.support.payloads import generate_body
from pdserve.tests.test_pd_cluster import assert_no_leaks

TIMEOUT_S = 1.0
SERVE_ARGS = ("--page-size", "4", "--chunked-prefill-size", "16", "--max-total-tokens", "32768",
              "--skip-server-warmup", "--disaggregation-timeout-s", str(TIMEOUT_S))
NUM_PROMPTS, PROMPT_TOKENS, MAX_NEW = 48, 512, 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    cfg = local_cluster_config(tmp_path_factory.mktemp("pd-backlog"), startup_timeout_s=180, serve_args=SERVE_ARGS)
    with Cluster(cfg) as c:
        yield c


def test_a_backlog_longer_than_the_timeout_fails_no_room(cluster: Cluster, oracle) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(4, 1000) for _ in range(PROMPT_TOKENS)] for _ in range(NUM_PROMPTS)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as http:
            return await asyncio.gather(*(http.post(f"{cluster.router_url}/generate", json=generate_body(ids, MAX_NEW))
                                          for ids in prompts))

    began = time.monotonic()
    responses = asyncio.run(burst())
    took_s = time.monotonic() - began
    assert [r.status_code for r in responses] == [200] * NUM_PROMPTS, [r.text for r in responses if r.status_code != 200][:2]
    # Otherwise this would show nothing: the last rooms waited several timeouts.
    assert took_s > 3 * TIMEOUT_S, f"the burst took only {took_s:.1f} s"
    for ids, resp in list(zip(prompts, responses))[:: NUM_PROMPTS // 4]:
        assert resp.json()["output_ids"] == oracle.greedy(ids, MAX_NEW)
    assert_no_leaks(cluster)
