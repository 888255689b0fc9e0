"""Load-balancing policies: how the router picks one worker among the healthy ones.

Policies are named in ``POLICIES`` (they add themselves with :func:`register_policy`); the router builds one
instance per role (prefill and decode may use different policies). ``select``
gets the healthy candidates (never empty) and the routing text of the request.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from pdserve.common.registry import Registry
from pdserve.router.config import CacheAwareConfig
from pdserve.router.radix_tree import RadixTree
from pdserve.router.workers import Worker

POLICIES: Registry[type[Policy]] = Registry("policy")


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
    def wrap(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        POLICIES.add(name, cls)
        return cls

    return wrap


def make_policy(name: str, cache_aware: CacheAwareConfig, seed: int | None = None) -> Policy:
    return POLICIES.get(name)(cache_aware=cache_aware, seed=seed)


class Policy(ABC):
    name = ""

    def __init__(self, cache_aware: CacheAwareConfig, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    @abstractmethod
    def select(self, workers: Sequence[Worker], text: str) -> Worker:
        """Pick one of ``workers`` (non-empty) for a request with routing ``text``."""

    def forget(self, worker: Worker) -> None:  # noqa: B027 - optional hook, no-op by default
        """The worker left for good; drop whatever the policy kept about it."""


@register_policy("round_robin")
class RoundRobin(Policy):
    def __init__(self, cache_aware: CacheAwareConfig, seed: int | None = None) -> None:
        super().__init__(cache_aware, seed)
        self._next = 0

    def select(self, workers: Sequence[Worker], text: str) -> Worker:
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker


@register_policy("random")
class RandomPolicy(Policy):
    def select(self, workers: Sequence[Worker], text: str) -> Worker:
        return self._rng.choice(list(workers))


@register_policy("power_of_two")
class PowerOfTwo(Policy):
    """Two random candidates, the less loaded wins (load includes our in-flight)."""

    def select(self, workers: Sequence[Worker], text: str) -> Worker:
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(list(workers), 2)
        return a if a.load <= b.load else b


@register_policy("cache_aware")
class CacheAware(Policy):
    """Route a prefix to where it was sent before, unless load is imbalanced.

    1. Imbalanced (max - min load > abs threshold and max > rel threshold * min):
       the least-loaded worker, so a hot prefix cannot pin one worker.
    2. Else the worker holding the longest prefix of the request text, when it
       covers more than ``cache_threshold`` of the text (ties: least loaded).
    3. Else the least-loaded worker.
    The chosen worker's tree share grows by the text; it is bounded per worker.
    """

    def __init__(self, cache_aware: CacheAwareConfig, seed: int | None = None) -> None:
        super().__init__(cache_aware, seed)
        self._config = cache_aware
        self._tree = RadixTree()

    def select(self, workers: Sequence[Worker], text: str) -> Worker:
        worker = self._choose(workers, text)
        if text:
            self._tree.insert(text, worker.url)
            self._tree.evict(worker.url, self._config.max_tree_chars)
        return worker

    def forget(self, worker: Worker) -> None:
        self._tree.remove_tenant(worker.url)

    def _choose(self, workers: Sequence[Worker], text: str) -> Worker:
        least = min(workers, key=lambda w: w.load)
        if self._imbalanced(workers) or not text:
            return least
        matched, holders = self._tree.match(text, [w.url for w in workers])
        if matched / len(text) > self._config.cache_threshold:
            return min((w for w in workers if w.url in holders), key=lambda w: w.load)
        return least

    def _imbalanced(self, workers: Sequence[Worker]) -> bool:
        loads = [w.load for w in workers]
        low, high = min(loads), max(loads)
        return (high - low > self._config.balance_abs_threshold
                and high > self._config.balance_rel_threshold * low)


def routing_text(body: dict[str, Any]) -> str:
    """The text a request's prefix cache would be keyed on, for cache_aware."""
    if isinstance(body.get("messages"), list):
        return "".join(_message_text(m) for m in body["messages"])
    for key in ("prompt", "text"):
        value = body.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            return _ids_text(value) if isinstance(value[0], int) else _join_first(value)
    ids = body.get("input_ids")
    return _ids_text(ids) if isinstance(ids, list) else ""


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):  # multi-part content: keep the text parts
        content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return f"<{message.get('role', '')}>{content if isinstance(content, str) else ''}"


def _join_first(value: list[Any]) -> str:
    # A batch: route on its first element, the whole batch goes to one worker.
    first = value[0]
    return first if isinstance(first, str) else _ids_text(first) if isinstance(first, list) else ""


def _ids_text(ids: list[Any]) -> str:
    # Token ids as text with a separator after each, so prefixes align on ids.
    return "".join(f"{i}," for i in ids)
