"""Prefix cache: a radix tree whose edges are whole pages of tokens.

Each node owns one page of KV for one page-sized run of tokens, reached by the
tokens before it. The cache holds one pool reference per node; a node whose page
nobody else references is evictable once it is a leaf, least recently used
first. Matching works at page granularity, so a hit never shares a partly
written page.

A full pool evicts a page for every request that crosses a page border in a
decode step; the candidates are a ``common.lru_heap.LruHeap`` kept across
calls, since a walk of the whole tree per call (tens of thousands of nodes
once the cache has filled the pool) cost milliseconds per request per step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from pdserve.common.lru_heap import LruHeap
from pdserve.model.kv_pool import KVPool


class _Node:
    __slots__ = ("key", "page", "children", "parent", "last_access")

    def __init__(self, key: tuple[int, ...], page: int, parent: _Node | None):
        self.key = key
        self.page = page
        self.children: dict[tuple[int, ...], _Node] = {}
        self.parent = parent
        self.last_access = 0


class RadixCache:
    def __init__(self, pool: KVPool, enabled: bool = True):
        self.pool = pool
        self.enabled = enabled
        self.page_size = pool.page_size
        self._root = _Node((), -1, None)
        self._num_nodes = 0
        self._clock = itertools.count(1)
        self._lru = LruHeap(self._candidates, self._access_if_evictable)

    @property
    def num_cached_pages(self) -> int:
        return self._num_nodes

    def _keys(self, tokens: list[int], num_tokens: int | None = None) -> Iterator[tuple[int, ...]]:
        """The keys of the full pages among the first ``num_tokens`` (default:
        all), built as they are asked for: a walk that misses early (most
        prompts matched against the cache) builds few, and copies nothing else."""
        size, end = self.page_size, len(tokens) if num_tokens is None else min(num_tokens, len(tokens))
        return (tuple(tokens[i : i + size]) for i in range(0, end - size + 1, size))

    def match_len(self, tokens: list[int], num_tokens: int | None = None) -> int:
        """Tokens of the first ``num_tokens`` of ``tokens`` (default: all)
        covered by cached pages, without touching LRU order."""
        node, matched = self._root, 0
        for key in self._keys(tokens, num_tokens) if self.enabled else []:
            node = node.children.get(key)
            if node is None:
                break
            matched += self.page_size
        return matched

    def match(self, tokens: list[int], num_tokens: int | None = None) -> list[int]:
        """Pages caching the longest page-aligned prefix of the first
        ``num_tokens`` of ``tokens`` (default: all); the caller takes a pool
        reference on them before anything can be evicted."""
        pages: list[int] = []
        if not self.enabled:
            return pages
        node, now = self._root, next(self._clock)
        for key in self._keys(tokens, num_tokens):
            node = node.children.get(key)
            if node is None:
                break
            node.last_access = now
            pages.append(node.page)
        return pages

    def insert(self, tokens: list[int], pages: list[int]) -> None:
        """Cache the full pages of a sequence whose KV is in ``pages``."""
        if not self.enabled:
            return
        node, now = self._root, next(self._clock)
        for key, page in zip(self._keys(tokens), pages):
            child = node.children.get(key)
            if child is None:
                child = _Node(key, page, node)
                node.children[key] = child
                self.pool.ref([page])
                self._num_nodes += 1
            child.last_access = now
            node = child
        if node is not self._root and not node.children:
            self._lru.push(node, now)  # a new or extended leaf: newest in the order

    def evict(self, num_pages: int) -> int:
        """Free up to ``num_pages`` pages that only the cache holds, least
        recently used first; returns how many."""
        freed = 0
        while freed < num_pages and (node := self._lru.pop()) is not None:
            parent = self._remove(node)
            freed += 1
            if parent is not self._root and not parent.children and self._evictable(parent):
                self._lru.push(parent, parent.last_access)
        return freed

    def _candidates(self):
        return ((n.last_access, n) for n in self._leaves() if self._evictable(n))

    def _access_if_evictable(self, node: _Node) -> int | None:
        if node.parent is None or node.children or not self._evictable(node):
            return None
        return node.last_access

    def reset(self) -> None:
        """Drop every node (``/flush_cache``); pages in use by requests stay theirs."""
        for node in list(self._walk()):
            self.pool.release([node.page])
        self._root = _Node((), -1, None)
        self._num_nodes = 0
        self._lru.clear()

    def _evictable(self, node: _Node) -> bool:
        return self.pool.ref_count(node.page) == 1

    def _remove(self, node: _Node) -> _Node:
        parent = node.parent
        del parent.children[node.key]
        node.parent = None  # an LRU heap entry of it is stale
        self.pool.release([node.page])
        self._num_nodes -= 1
        return parent

    def _walk(self):
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _leaves(self):
        return (n for n in self._walk() if not n.children)
