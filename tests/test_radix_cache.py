"""The page-granular prefix cache: match, insert, LRU eviction and reset, with exact refcounts."""

from __future__ import annotations

import pytest
from pdserve.engine.radix_cache import RadixCache
from pdserve.model.kv_pool import KVPool
from pdserve.tests.support.calls import CallCounter
from pdserve.tests.support.kv_pools import make_pool

PAGE = 4


@pytest.fixture
def pool() -> KVPool:
    return make_pool(num_pages=16, page_size=PAGE)


@pytest.fixture
def cache(pool: KVPool) -> RadixCache:
    return RadixCache(pool)


def finish(pool: KVPool, cache: RadixCache, tokens: list[int]) -> list[int]:
    """A request that computed ``tokens`` ends: its full pages go to the cache, it lets go of all."""
    pages = pool.alloc(-(-len(tokens) // PAGE))
    cache.insert(tokens, pages)
    pool.release(pages)
    return pages


def test_insert_caches_full_pages_only(pool: KVPool, cache: RadixCache) -> None:
    pages = finish(pool, cache, list(range(10)))  # two full pages and a partial one
    assert cache.num_cached_pages == 2
    assert [pool.ref_count(p) for p in pages] == [1, 1, 0]
    assert pool.num_free_pages == 16 - 2


def test_match_longest_page_aligned_prefix(pool: KVPool, cache: RadixCache) -> None:
    pages = finish(pool, cache, list(range(12)))
    assert cache.match(list(range(12))) == pages
    assert cache.match(list(range(11))) == pages[:2]
    assert cache.match(list(range(3))) == []
    assert cache.match([0, 1, 2, 3, 99, 5, 6, 7]) == pages[:1]
    assert cache.match_len(list(range(9))) == 8
    assert cache.match([7, 7, 7, 7]) == []


def test_shared_prefix_is_stored_once(pool: KVPool, cache: RadixCache) -> None:
    first = finish(pool, cache, list(range(8)))
    second = finish(pool, cache, list(range(4)) + [50, 51, 52, 53])
    assert cache.num_cached_pages == 3
    # The second request's copy of the shared page was not cached, so it was freed.
    assert pool.ref_count(second[0]) == 0 and pool.ref_count(first[0]) == 1
    assert cache.match(list(range(4)) + [50, 51, 52, 53]) == [first[0], second[1]]


def test_evict_lru_leaves_first(pool: KVPool, cache: RadixCache) -> None:
    old = finish(pool, cache, [1] * 8)
    new = finish(pool, cache, [2] * 8)
    cache.match([1] * 8)  # touching the old branch makes the other one the LRU
    assert cache.evict(1) == 1
    assert pool.ref_count(new[1]) == 0 and pool.ref_count(new[0]) == 1  # leaf before its parent
    assert cache.evict(1) == 1
    assert pool.ref_count(new[0]) == 0
    assert cache.match([1] * 8) == old
    assert cache.evict(10) == 2 and cache.num_cached_pages == 0
    assert pool.num_free_pages == 16


def test_pages_in_use_are_not_evicted(pool: KVPool, cache: RadixCache) -> None:
    pages = finish(pool, cache, list(range(8)))
    held = cache.match(list(range(8)))
    pool.ref(held)  # a running request shares the cached prefix
    assert cache.evict(5) == 0
    assert cache.num_cached_pages == 2
    pool.release(held)
    assert cache.evict(5) == 2
    assert [pool.ref_count(p) for p in pages] == [0, 0]


def test_parent_in_use_child_evictable(pool: KVPool, cache: RadixCache) -> None:
    pages = finish(pool, cache, list(range(8)))
    pool.ref(pages[:1])
    assert cache.evict(5) == 1
    assert pool.ref_count(pages[0]) == 2 and pool.ref_count(pages[1]) == 0
    pool.release(pages[:1])


def test_reset_drops_only_the_cache_references(pool: KVPool, cache: RadixCache) -> None:
    pages = finish(pool, cache, list(range(12)))
    held = cache.match(list(range(4)))
    pool.ref(held)
    cache.reset()
    assert cache.num_cached_pages == 0 and cache.match(list(range(12))) == []
    assert pool.ref_count(held[0]) == 1  # still the request's
    assert [pool.ref_count(p) for p in pages[1:]] == [0, 0]
    pool.release(held)
    assert pool.num_free_pages == 16
    cache.reset()  # nothing left: must not free anything twice
    assert pool.num_free_pages == 16


def test_disabled_cache_keeps_nothing(pool: KVPool) -> None:
    cache = RadixCache(pool, enabled=False)
    pages = finish(pool, cache, list(range(8)))
    assert cache.num_cached_pages == 0 and cache.match(list(range(8))) == [] and cache.match_len(list(range(8))) == 0
    assert [pool.ref_count(p) for p in pages] == [0, 0]


def test_no_page_freed_twice_under_churn(pool: KVPool, cache: RadixCache) -> None:
    """Many overlapping requests, evictions and a reset: the pool's own checks never fire."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 13))]
        matched = cache.match(tokens)
        pool.ref(matched)
        need = -(-len(tokens) // PAGE) - len(matched)
        if need > pool.num_free_pages:
            cache.evict(need - pool.num_free_pages)
        if need > pool.num_free_pages:
            pool.release(matched)
            continue
        pages = matched + pool.alloc(need)
        cache.insert(tokens, pages)
        pool.release(pages)
        if rng.random() < 0.05:
            cache.reset()
    assert pool.num_free_pages + cache.num_cached_pages == 16
    cache.reset()
    assert pool.num_free_pages == 16


def _lru_order_reference(cache: RadixCache) -> list[int]:
    """Pages in the order a full LRU pass would evict them (leaves first,
    least recently used first), without evicting: what the kept heap must match."""
    import heapq

    heap = [(n.last_access, n.page, n) for n in cache._leaves() if cache._evictable(n)]
    heapq.heapify(heap)
    children = {id(n): len(n.children) for n in cache._walk()}
    order = []
    while heap:
        _, page, node = heapq.heappop(heap)
        order.append(page)
        parent = node.parent
        if parent is not cache._root:
            children[id(parent)] -= 1
            if not children[id(parent)] and cache._evictable(parent):
                heapq.heappush(heap, (parent.last_access, parent.page, parent))
    return order


def test_a_full_pool_evicting_a_page_at_a_time_walks_the_tree_at_most_once() -> None:
    """As a decode step's requests cross page borders one by one: each call
    frees the next least recently used page, from a heap kept across calls."""
    pool = make_pool(num_pages=64, page_size=PAGE)
    cache = RadixCache(pool)
    pages = [finish(pool, cache, [i] * PAGE)[0] for i in range(60)]  # 60 one-page prompts, oldest first
    walks = CallCounter(cache, "_leaves")
    freed = []
    for _ in range(50):
        before = {p for p in pages if pool.ref_count(p)}
        assert cache.evict(1) == 1
        freed += [p for p in before if not pool.ref_count(p)]
    assert freed == pages[:50]
    assert walks.calls <= 1


def test_eviction_order_stays_lru_as_the_tree_changes_between_calls(pool: KVPool, cache: RadixCache) -> None:
    a = finish(pool, cache, [1] * PAGE)
    b = finish(pool, cache, [2] * PAGE)
    c = finish(pool, cache, [3] * PAGE)
    assert cache.evict(1) == 1 and pool.ref_count(a[0]) == 0  # the heap is built here
    cache.match([2] * PAGE)  # b is now newer than c
    d = finish(pool, cache, [4] * 2 * PAGE)  # cached after the heap was built: newest
    assert _lru_order_reference(cache) == [c[0], b[0], d[1], d[0]]
    order = []
    while cache.num_cached_pages:
        held = {p for p in (b[0], c[0], d[0], d[1]) if pool.ref_count(p)}
        assert cache.evict(1) == 1
        order += [p for p in held if not pool.ref_count(p)]
    assert order == [c[0], b[0], d[1], d[0]]


def test_a_page_in_use_when_the_heap_was_built_is_evicted_once_released(pool: KVPool, cache: RadixCache) -> None:
    pages = finish(pool, cache, [5] * PAGE)
    pool.ref(pages)  # a running request holds the cached page
    assert cache.evict(1) == 0
    pool.release(pages)
    assert cache.evict(1) == 1 and pool.ref_count(pages[0]) == 0


def test_a_leaf_used_after_a_newer_one_was_cached_outlives_it(pool: KVPool, cache: RadixCache) -> None:
    """A hot prefix touched after colder prompts were cached is evicted after them."""
    hot = finish(pool, cache, [1] * PAGE)
    old = [finish(pool, cache, [k] * PAGE)[0] for k in (2, 3)]
    cache.match([1] * PAGE)
    assert cache.evict(1) == 1 and pool.ref_count(old[0]) == 0  # the heap exists from here on
    cold = finish(pool, cache, [4] * PAGE)
    cache.match([1] * PAGE)  # the hot prefix is used again: newest
    expected = [old[1], cold[0], hot[0]]
    assert _lru_order_reference(cache) == expected
    order = []
    for _ in range(3):
        held = {p for p in expected if pool.ref_count(p)}
        assert cache.evict(1) == 1
        order += [p for p in held if not pool.ref_count(p)]
    assert order == expected
