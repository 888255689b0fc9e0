"""The paged KV pool: allocation, reference counts, and exactly-once freeing."""

from __future__ import annotations

import pytest
from pdserve.model.kv_pool import OutOfPages
from pdserve.tests.support.kv_pools import make_pool


def test_buffer_follows_layout() -> None:
    pool = make_pool(num_pages=5, page_size=3)
    assert pool.buffer.shape == (2, 2, 5, 3, 2, 8)
    assert pool.buffer.numel() * pool.buffer.element_size() == pool.layout.total_bytes
    assert pool.num_pages == pool.num_free_pages == 5 and pool.page_size == 3


def test_alloc_gives_distinct_pages_with_one_reference() -> None:
    pool = make_pool()
    pages = pool.alloc(3) + pool.alloc(5)
    assert sorted(pages) == list(range(8))
    assert all(pool.ref_count(p) == 1 for p in pages)
    assert pool.num_free_pages == 0
    with pytest.raises(OutOfPages):
        pool.alloc(1)


def test_alloc_fails_without_taking_anything() -> None:
    pool = make_pool()
    pool.alloc(6)
    with pytest.raises(OutOfPages):
        pool.alloc(3)
    assert pool.num_free_pages == 2


def test_page_returns_when_last_reference_goes() -> None:
    pool = make_pool()
    pages = pool.alloc(2)
    pool.ref(pages)
    assert [pool.ref_count(p) for p in pages] == [2, 2]
    pool.release(pages)
    assert pool.num_free_pages == 6
    pool.release(pages[:1])
    assert pool.num_free_pages == 7 and pool.ref_count(pages[0]) == 0
    pool.release(pages[1:])
    assert pool.num_free_pages == 8


def test_freed_pages_are_reused() -> None:
    pool = make_pool(num_pages=2)
    first = pool.alloc(2)
    pool.release(first)
    assert sorted(pool.alloc(2)) == sorted(first)


def test_double_free_raises() -> None:
    pool = make_pool()
    pages = pool.alloc(1)
    pool.release(pages)
    with pytest.raises(RuntimeError):
        pool.release(pages)
    assert pool.num_free_pages == 8  # the page is on the free list once, not twice


def test_ref_on_free_page_raises() -> None:
    pool = make_pool()
    with pytest.raises(RuntimeError):
        pool.ref([0])
