"""Routing policies and the approximate radix tree behind cache_aware."""

from __future__ import annotations

from collections import Counter

import pytest
from pdserve.router.config import CacheAwareConfig
from pdserve.router.policies import POLICIES, make_policy, routing_text
from pdserve.router.radix_tree import RadixTree
from pdserve.router.workers import DECODE, Worker
from pdserve.tests.support.calls import CallCounter


def workers(*loads: int) -> list[Worker]:
    return [Worker(url=f"http://w{i}", role=DECODE, healthy=True, num_running_reqs=load)
            for i, load in enumerate(loads)]


def test_registry_knows_every_policy() -> None:
    assert POLICIES.names() == ("cache_aware", "power_of_two", "random", "round_robin")
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        make_policy("fastest", CacheAwareConfig())


def test_round_robin_alternates() -> None:
    policy, pool = make_policy("round_robin", CacheAwareConfig()), workers(0, 0, 0)
    picks = [policy.select(pool, "x").url for _ in range(6)]
    assert picks == [w.url for w in pool] * 2


def test_random_uses_every_candidate_and_only_those() -> None:
    policy, pool = make_policy("random", CacheAwareConfig(), seed=7), workers(0, 0, 0)
    counts = Counter(policy.select(pool[:2], "x").url for _ in range(200))
    assert set(counts) == {pool[0].url, pool[1].url}
    assert min(counts.values()) > 60


def test_power_of_two_prefers_the_less_loaded() -> None:
    policy = make_policy("power_of_two", CacheAwareConfig(), seed=1)
    pool = workers(0, 5, 10)
    counts = Counter(policy.select(pool, "x").url for _ in range(300))
    assert pool[2].url not in counts  # the most loaded loses every pairing
    assert counts[pool[0].url] > counts[pool[1].url] > 0
    # The router's own in-flight count is part of the load.
    pool[0].in_flight = 20
    assert {policy.select(pool[:2], "x").url for _ in range(20)} == {pool[1].url}


def test_cache_aware_sends_a_shared_prefix_to_the_same_worker() -> None:
    policy, pool = make_policy("cache_aware", CacheAwareConfig()), workers(0, 0)
    system = "You are a helpful assistant. " * 4
    first = policy.select(pool, system + "question A")
    first.in_flight += 1  # the first worker is now the busier one
    assert policy.select(pool, system + "question B") is first
    # No useful match: the least-loaded worker gets a new prefix.
    assert policy.select(pool, "something else entirely") is not first


def test_cache_aware_gives_up_the_prefix_when_load_is_imbalanced() -> None:
    config = CacheAwareConfig(balance_abs_threshold=4, balance_rel_threshold=1.5)
    policy, pool = make_policy("cache_aware", config), workers(0, 0)
    hot = policy.select(pool, "the same long prompt")
    hot.num_running_reqs = 10
    other = next(w for w in pool if w is not hot)
    assert policy.select(pool, "the same long prompt") is other


def test_cache_aware_ignores_matches_held_only_by_unhealthy_workers() -> None:
    policy, pool = make_policy("cache_aware", CacheAwareConfig()), workers(0, 3)
    policy.select(pool[1:], "a prompt held by worker one")
    assert policy.select(pool[:1], "a prompt held by worker one") is pool[0]


def test_radix_tree_matches_longest_prefix_per_tenant() -> None:
    tree = RadixTree()
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    assert tree.match("hello world!", ["a", "b"]) == (11, {"a"})
    assert tree.match("hello wor", ["a", "b"]) == (9, {"a"})
    assert tree.match("hello, you", ["a", "b"]) == (5, {"a", "b"})
    assert tree.match("hello there", ["a"]) == (6, {"a"})
    assert tree.match("bye", ["a", "b"]) == (0, set())
    assert tree.tenant_chars("a") == len("hello world")
    assert tree.tenant_chars("b") == len("hello there")


def test_radix_tree_evicts_least_recently_used_leaves_first() -> None:
    tree = RadixTree()
    tree.insert("aaaa-old", "t")
    tree.insert("bbbb-new", "t")
    tree.evict("t", max_chars=10)
    assert tree.tenant_chars("t") <= 10
    assert tree.match("bbbb-new", ["t"])[0] == 8
    assert tree.match("aaaa-old", ["t"])[0] == 0
    tree.remove_tenant("t")
    assert tree.tenant_chars("t") == 0
    assert tree.match("bbbb-new", ["t"]) == (0, set())


def test_cache_aware_tree_stays_bounded_per_worker() -> None:
    policy = make_policy("cache_aware", CacheAwareConfig(max_tree_chars=500))
    pool = workers(0)
    for i in range(200):
        policy.select(pool, f"prompt number {i} " * 3)
    assert 0 < policy._tree.tenant_chars(pool[0].url) <= 500


def test_routing_text_covers_every_request_shape() -> None:
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert routing_text(chat) == "<system>be brief<user>hi"
    assert routing_text({"prompt": "abc"}) == "abc"
    assert routing_text({"prompt": ["first", "second"]}) == "first"
    assert routing_text({"prompt": [1, 22, 3]}) == "1,22,3,"
    assert routing_text({"text": "native"}) == "native"
    assert routing_text({"input_ids": [5, 6]}) == "5,6,"
    assert routing_text({"prompt": {"odd": 1}}) == ""


def test_radix_tree_at_its_bound_evicts_without_walking_per_request() -> None:
    tree = RadixTree()
    for i in range(50):
        tree.insert(f"{i:03d}" + "x" * 20, "t")
    walks = CallCounter(tree, "_tenant_leaves")
    bound = tree.tenant_chars("t")
    for i in range(50, 150):  # each new text pushes the oldest out
        tree.insert(f"{i:03d}" + "x" * 20, "t")
        tree.evict("t", bound)
        assert tree.tenant_chars("t") <= bound
    assert walks.calls <= 2
    assert tree.match("149" + "x" * 20, ["t"])[0] == 23
    assert tree.match("050" + "x" * 20, ["t"])[0] < 23  # old and cold: gone


def test_radix_tree_keeps_a_text_sent_again_over_older_ones() -> None:
    tree = RadixTree()
    for text in ("hhhhh", "ooooo", "ppppp", "hhhhh"):
        tree.insert(text, "t")
    tree.evict("t", 10)
    assert tree.match("ooooo", ["t"])[0] == 0
    tree.insert("ccccc", "t")
    tree.insert("hhhhh", "t")  # sent again after ccccc: the newest
    tree.evict("t", 10)
    assert tree.match("ppppp", ["t"])[0] == 0 and tree.match("ccccc", ["t"])[0] == 5
    tree.evict("t", 5)
    assert tree.match("ccccc", ["t"])[0] == 0 and tree.match("hhhhh", ["t"])[0] == 5
