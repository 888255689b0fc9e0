"""The eviction candidates kept across evictions (``common.lru_heap``): oldest
first, entries checked when popped, walks only when dry or mostly stale."""

from __future__ import annotations

from pdserve.common import lru_heap
from pdserve.common.lru_heap import LruHeap


class _Tree:
    """Leaves with an access time; ``alive`` are evictable."""

    def __init__(self, leaves: dict[str, int]) -> None:
        self.access = dict(leaves)
        self.walks = 0

    def candidates(self):
        self.walks += 1
        return [(t, name) for name, t in self.access.items()]

    def access_of(self, name: str) -> int | None:
        return self.access.get(name)

    def heap(self) -> LruHeap[str]:
        return LruHeap(self.candidates, self.access_of)

    def evict(self, heap: LruHeap[str]) -> str | None:
        name = heap.pop()
        if name is not None:
            del self.access[name]
        return name


def test_pops_oldest_first_and_walks_once() -> None:
    tree = _Tree({"a": 3, "b": 1, "c": 2})
    heap = tree.heap()
    assert [tree.evict(heap) for _ in range(4)] == ["b", "c", "a", None]
    assert tree.walks == 2  # the first pop, and the one that found nothing left


def test_a_node_used_since_it_was_pushed_moves_to_its_new_place() -> None:
    tree = _Tree({"a": 1, "b": 2, "c": 3})
    heap = tree.heap()
    assert tree.evict(heap) == "a"
    tree.access["b"] = 10  # used again
    assert [tree.evict(heap), tree.evict(heap)] == ["c", "b"]


def test_a_pushed_leaf_takes_its_place_without_a_walk() -> None:
    tree = _Tree({"a": 1, "b": 5})
    heap = tree.heap()
    assert tree.evict(heap) == "a"
    tree.access["new"] = 3
    heap.push("new", 3)
    assert [tree.evict(heap), tree.evict(heap)] == ["new", "b"]
    assert tree.walks == 1


def test_an_entry_not_evictable_when_popped_is_skipped_and_found_by_the_next_walk() -> None:
    tree = _Tree({"a": 1, "b": 2, "c": 3})
    heap = tree.heap()
    assert tree.evict(heap) == "a"
    in_use = tree.access.pop("b")  # a running request holds it
    assert tree.evict(heap) == "c"
    tree.access["b"] = in_use  # released
    assert tree.evict(heap) == "b"
    assert tree.walks == 2


def test_a_heap_of_mostly_stale_entries_is_walked_again(monkeypatch) -> None:
    monkeypatch.setattr(lru_heap, "MIN_WALKED_LEN", 4)
    tree = _Tree({"a": 1})
    heap = tree.heap()
    assert tree.evict(heap) == "a"  # walk 1: the heap is empty after it
    for t in range(2, 12):  # a leaf pushed and gone again, over and over
        tree.access["x"] = t
        heap.push("x", t)
        del tree.access["x"]
    assert tree.walks == 2  # past twice the minimum: walked again, the stale entries dropped
    assert len(heap._heap) <= 8
