"""An approximate, multi-tenant radix tree of request text, for cache-aware routing.

The router cannot see the workers' real prefix caches, so it remembers which
text it sent where: every node is tagged with the tenants (workers) whose
requests passed through it, with a logical access time. A tenant on a node is
on all its ancestors, so the deepest node carrying a tenant bounds the prefix
that tenant has probably cached. Each tenant's share is bounded in characters;
its least recently used leaves are dropped first, as a real cache would.
Once a tenant is at its bound every routed request evicts a little, so its
candidates are a ``common.lru_heap.LruHeap`` kept across requests (a walk of
the tenant's whole subtree per request cost ~0.6 ms at SGLang's default
bound of 4M characters).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection

from pdserve.common.lru_heap import LruHeap


class _Node:
    __slots__ = ("text", "children", "parent", "tenants")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text  # edge label from the parent
        self.children: dict[str, _Node] = {}  # keyed by first character
        self.parent = parent
        self.tenants: dict[str, int] = {}  # tenant -> last access tick


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixTree:
    def __init__(self) -> None:
        self._root = _Node("", None)
        self._ticks = itertools.count(1)
        self._chars: dict[str, int] = {}  # tenant -> characters it owns
        self._lru: dict[str, LruHeap[_Node]] = {}  # tenant -> its eviction candidates

    def tenant_chars(self, tenant: str) -> int:
        return self._chars.get(tenant, 0)

    def insert(self, text: str, tenant: str) -> None:
        tick = next(self._ticks)
        node, pos = self._root, 0
        node.tenants[tenant] = tick
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                child = _Node(text[pos:], node)
                node.children[text[pos]] = child
            else:
                shared = _common_prefix_len(child.text, text[pos:])
                if shared < len(child.text):
                    child = self._split(child, shared)
            if tenant not in child.tenants:
                self._chars[tenant] = self._chars.get(tenant, 0) + len(child.text)
            child.tenants[tenant] = tick
            node, pos = child, pos + len(child.text)
        lru = self._lru.get(tenant)
        if lru is not None and node is not self._root and not self._has_tenant_child(node, tenant):
            lru.push(node, tick)  # the tenant's newest leaf

    def match(self, text: str, tenants: Collection[str]) -> tuple[int, set[str]]:
        """Longest prefix of ``text`` held by any of ``tenants``: (chars, holders)."""
        alive = set(tenants)
        node, pos, best = self._root, 0, alive & set(self._root.tenants)
        while pos < len(text) and best:
            child = node.children.get(text[pos])
            holders = alive & set(child.tenants) if child else set()
            if not holders:
                break
            shared = _common_prefix_len(child.text, text[pos:])
            pos, best = pos + shared, holders
            if shared < len(child.text):
                break
            node = child
        return (pos, best) if pos else (0, set())

    def remove_tenant(self, tenant: str) -> None:
        self.evict(tenant, max_chars=0)

    def evict(self, tenant: str, max_chars: int) -> None:
        """Drop ``tenant``'s least recently used leaves until it owns <= max_chars."""
        if self._chars.get(tenant, 0) <= max_chars:
            return
        lru = self._lru.get(tenant)
        if lru is None:
            lru = self._lru[tenant] = self._tenant_lru(tenant)
        while self._chars[tenant] > max_chars and (node := lru.pop()) is not None:
            del node.tenants[tenant]
            self._chars[tenant] -= len(node.text)
            parent = node.parent
            if not node.tenants:
                del parent.children[node.text[0]]
            if parent is not self._root and not self._has_tenant_child(parent, tenant):
                lru.push(parent, parent.tenants[tenant])
        if self._chars[tenant] <= 0:
            self._chars.pop(tenant)
            self._lru.pop(tenant, None)
            self._root.tenants.pop(tenant, None)

    def _tenant_lru(self, tenant: str) -> LruHeap[_Node]:
        def access_if_leaf(node: _Node) -> int | None:
            tick = node.tenants.get(tenant)
            return None if tick is None or self._has_tenant_child(node, tenant) else tick

        return LruHeap(lambda: ((n.tenants[tenant], n) for n in self._tenant_leaves(tenant)), access_if_leaf)

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut ``child``'s edge at ``at``; returns the new upper node."""
        parent = child.parent
        upper = _Node(child.text[:at], parent)
        upper.tenants = dict(child.tenants)
        parent.children[upper.text[0]] = upper
        child.text = child.text[at:]
        child.parent = upper
        upper.children[child.text[0]] = child
        return upper

    @staticmethod
    def _has_tenant_child(node: _Node, tenant: str) -> bool:
        return any(tenant in c.tenants for c in node.children.values())

    def _tenant_leaves(self, tenant: str) -> list[_Node]:
        leaves, stack = [], [self._root]
        while stack:
            node = stack.pop()
            owned = [c for c in node.children.values() if tenant in c.tenants]
            if not owned and node is not self._root:
                leaves.append(node)
            stack.extend(owned)
        return leaves
