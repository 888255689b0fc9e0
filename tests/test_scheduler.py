"""The scheduler alone: chunked prefill, admission limits, decode batches and retraction."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.radix_cache import RadixCache
from pdserve.engine.request import Req
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.model.batch import ScheduledBatch
from pdserve.tests.support.calls import CallCounter
from pdserve.tests.support.kv_pools import make_pool

PAGE = 4
BASE = SchedulerConfig(
    page_size=PAGE,
    max_running_requests=8,
    chunked_prefill_size=16,
    max_prefill_tokens=64,
    schedule_policy="fcfs",
    schedule_conservativeness=1.0,
    context_len=512,
)


def make_scheduler(num_pages: int = 64, radix: bool = True, **overrides: object) -> Scheduler:
    pool = make_pool(num_pages=num_pages, page_size=PAGE)
    return Scheduler(replace(BASE, **overrides), pool, RadixCache(pool, enabled=radix))


def make_req(rid: str, prompt_len: int, max_new: int = 4, first: int = 10) -> Req:
    return Req(rid, list(range(first, first + prompt_len)), SamplingParams(max_new_tokens=max_new, temperature=0.0))


def step(sched: Scheduler) -> ScheduledBatch | None:
    """One engine step without a model: every due request gets token 7."""
    batch = sched.schedule()
    for req in sched.advance(batch) if batch is not None else []:
        req.output_ids.append(7)
        if len(req.output_ids) >= req.params.max_new_tokens:
            req.finish_reason = "length"
    for req in sched.pop_finished():
        sched.release(req)
    for req in sched.running:
        # The engine's invariant: the pages hold every computed token.
        assert len(req.pages) * PAGE >= req.num_computed
    return batch


def test_long_prompt_is_chunked() -> None:
    sched = make_scheduler()
    req = make_req("a", 40)
    sched.add(req)
    sizes = []
    while (batch := step(sched)) is not None and not batch.is_decode:
        sizes.append([len(c) for c in batch.chunks])
        assert batch.starts == [sum(s[0] for s in sizes[:-1])]
    assert sizes == [[16], [16], [8]]
    assert req.output_ids  # the last chunk sampled the first token


def test_chunks_feed_the_prompt_in_order() -> None:
    sched = make_scheduler()
    req = make_req("a", 37)
    sched.add(req)
    fed = []
    while (batch := sched.schedule()) is not None and not batch.is_decode:
        fed += batch.chunks[0]
        sched.advance(batch)
    assert fed == req.prompt_ids


def test_no_chunking_when_disabled() -> None:
    sched = make_scheduler(chunked_prefill_size=None, max_prefill_tokens=1000)
    sched.add(make_req("a", 100))
    assert [len(c) for c in sched.schedule().chunks] == [100]


def test_prefill_budget_spans_requests() -> None:
    sched = make_scheduler(max_prefill_tokens=20)
    for i in range(3):
        sched.add(make_req(str(i), 8, first=100 * i))
    batch = sched.schedule()
    # 8 + 8, then 4 of the third before the budget runs out.
    assert [len(c) for c in batch.chunks] == [8, 8, 4]
    assert sched.chunked is batch.reqs[2]
    assert sum(len(c) for c in batch.chunks) <= 20


def test_max_running_requests() -> None:
    sched = make_scheduler(max_running_requests=2)
    reqs = [make_req(str(i), 5, max_new=3, first=100 * i) for i in range(3)]
    for req in reqs:
        sched.add(req)
    first = step(sched)
    assert first.reqs == reqs[:2] and sched.waiting == [reqs[2]]
    # Decoding fills the two slots until they finish; only then the third starts.
    while reqs[0].finish_reason is None:
        batch = step(sched)
        assert batch.is_decode and len(batch.reqs) <= 2
        assert sched.waiting == [reqs[2]]
    assert step(sched).reqs == [reqs[2]]


def test_decode_batches_every_running_request() -> None:
    sched = make_scheduler()
    reqs = [make_req(str(i), 3 + i, max_new=5, first=100 * i) for i in range(3)]
    for req in reqs:
        sched.add(req)
    assert not step(sched).is_decode
    batch = step(sched)
    assert batch.is_decode and sorted(r.rid for r in batch.reqs) == ["0", "1", "2"]
    assert all(len(c) == 1 and c[0] == r.all_ids[-2] for c, r in zip(batch.chunks, batch.reqs))
    assert batch.starts == [r.seq_len - 2 for r in batch.reqs]


def _decoding(rid: str, prompt_len: int, num_outputs: int, sched: Scheduler) -> Req:
    """A running request whose next decode step needs one more page than it holds."""
    req = make_req(rid, prompt_len, max_new=50, first=len(sched.running) * 100)
    req.output_ids = [7] * num_outputs
    req.num_computed = req.seq_len - 1
    req.pages = sched.pool.alloc(-(-req.num_computed // PAGE))
    sched.running.append(req)
    return req


def test_retraction_victim_has_least_progress(caplog: pytest.LogCaptureFixture) -> None:
    sched = make_scheduler(num_pages=5, radix=False)
    ahead = _decoding("ahead", 4, 5, sched)  # most outputs
    long_prompt = _decoding("long", 8, 1, sched)  # fewest outputs, longest prompt
    short_prompt = _decoding("short", 4, 1, sched)
    assert sched.pool.num_free_pages == 0
    with caplog.at_level(logging.INFO, logger="pdserve.scheduler"):
        batch = sched.schedule()
    assert "KV cache pool is full. Retract requests." in caplog.text
    assert sched.num_retracted_total == 1
    assert sched.waiting == [long_prompt] and long_prompt.pages == [] and long_prompt.num_computed == 0
    assert long_prompt.output_ids == [7]  # kept: recomputed later, not sampled again
    assert sorted(r.rid for r in batch.reqs) == ["ahead", "short"]
    assert len(ahead.pages) == 3 and len(short_prompt.pages) == 2
    assert sched.new_token_ratio > sched.init_new_token_ratio - 0.01


def test_retracted_request_resumes_and_finishes() -> None:
    # 6 pages: both fit at admission, not once both have grown.
    sched = make_scheduler(num_pages=6, radix=False)
    first, second = make_req("first", 4, max_new=12, first=100), make_req("second", 3, max_new=12, first=200)
    sched.add(first)
    step(sched)
    sched.add(second)
    while sched.num_retracted_total == 0:
        assert step(sched) is not None
    # Tied on outputs: the longer prompt goes back to the head of the queue.
    assert sched.waiting == [first] and first.pages == []
    while first.finish_reason is None or second.finish_reason is None:
        step(sched)
    assert len(first.output_ids) == len(second.output_ids) == 12
    assert sched.pool.num_free_pages == 6


def test_lone_request_that_cannot_grow_is_cut() -> None:
    sched = make_scheduler(num_pages=3, radix=False)
    req = make_req("a", 8, max_new=100)
    sched.add(req)
    while req.finish_reason is None:
        step(sched)
    assert req.finish_reason == "length" and len(req.output_ids) < 100
    assert sched.pool.num_free_pages == 3


def test_prefix_match_skips_cached_tokens() -> None:
    sched = make_scheduler()
    first = make_req("a", 20, max_new=1)
    sched.add(first)
    while first.finish_reason is None:
        step(sched)
    second = make_req("b", 20, max_new=1)
    sched.add(second)
    batch = sched.schedule()
    assert second.num_cached_tokens == 16 and batch.starts == [16] and batch.chunks == [second.prompt_ids[16:]]


def test_lpm_orders_waiting_by_cached_prefix() -> None:
    sched = make_scheduler(schedule_policy="lpm", max_running_requests=1)
    warm = make_req("warm", 12, max_new=1, first=500)
    sched.add(warm)
    step(sched)
    cold, hot = make_req("cold", 12, max_new=1, first=0), make_req("hot", 12, max_new=1, first=500)
    sched.add(cold)
    sched.add(hot)
    assert step(sched).reqs == [hot]


def test_lpm_serves_a_long_queue_in_arrival_order(monkeypatch) -> None:
    import pdserve.engine.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "LPM_MAX_WAITING", 2)
    sched = make_scheduler(schedule_policy="lpm", max_running_requests=1)
    sched.add(make_req("warm", 12, max_new=1, first=500))
    step(sched)
    cold, other, hot = (make_req(rid, 12, max_new=1, first=first) for rid, first in (("cold", 0), ("other", 900), ("hot", 500)))
    for req in (cold, other, hot):
        sched.add(req)
    assert step(sched).reqs == [cold]  # three waiting: arrival order, though hot has a cached prefix
    assert step(sched).reqs == [hot]  # two left: lpm again, and the cached prefix goes first


def test_remove_takes_a_request_out_of_every_queue() -> None:
    sched = make_scheduler(max_prefill_tokens=8)
    long, short = make_req("long", 30), make_req("short", 4, first=99)
    sched.add(long)
    sched.add(short)
    sched.schedule()  # "long" is now part-way prefilled
    assert sched.chunked is long
    assert sched.remove("long") is long and sched.chunked is None
    assert sched.remove("short") is short and sched.waiting == []
    assert sched.remove("nope") is None
    sched.release(long, cache=False)
    assert sched.pool.num_free_pages == sched.pool.num_pages


def test_decoding_with_the_pool_full_of_cache_evicts_a_page_per_border_without_a_walk_per_page() -> None:
    """A server that has run a while: finished prompts fill every free page of
    the pool. Decoding requests then take each new page from the cache, least
    recently used first, and the cache walks its tree at most once for all of them."""
    sched = make_scheduler(num_pages=64, max_running_requests=4)
    for i in range(4):
        sched.add(make_req(f"r{i}", 8, max_new=24, first=1000 * (i + 1)))
    while not sched.running or sched.waiting:
        step(sched)
    pool, cache = sched.pool, sched.cache
    old = []
    while pool.num_free_pages:  # cached prompts nobody runs, oldest first
        pages = pool.alloc(1)
        cache.insert([90_000 + len(old)] * PAGE, pages)
        pool.release(pages)
        old += pages
    walks = CallCounter(cache, "_leaves")
    while sched.running:
        step(sched)
    evicted = [p for i, p in enumerate(old) if not cache.match([90_000 + i] * PAGE)]
    assert len(evicted) >= 4 * 5  # each request crossed at least 5 page borders
    assert evicted == old[: len(evicted)]  # least recently cached first
    assert walks.calls <= 1
