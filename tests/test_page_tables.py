"""Page lists mirrored across steps (``model/page_tables.py``): a step's page
index must be exactly the lists' pages, however the lists changed since."""

from __future__ import annotations

import random

import numpy as np
from pdserve.model.kernels.step_inputs import _ragged_step, build_step
from pdserve.model.page_tables import PageTables


def _flat(page_lists: list[list[int]], num_pages: list[int]) -> list[int]:
    return [p for pages, n in zip(page_lists, num_pages) for p in pages[:n]]


def _gather(tables: PageTables, page_lists: list[list[int]], num_pages: list[int]) -> list[int]:
    got = tables.gather(page_lists, np.asarray(num_pages, dtype=np.int64))
    assert got.dtype == np.int32
    return got.tolist()


def test_lists_that_grow_are_replaced_and_come_and_go_read_as_they_are_now() -> None:
    """Random steps over few rows and a narrow table: rows are reused and
    the table grows, and every step reads what the lists hold."""
    rng = random.Random(0)
    tables = PageTables(num_rows=2, width=2, keep_steps=1)
    next_page = iter(range(10**6))
    lists = [[next(next_page)] for _ in range(6)]
    batch: list[list[int]] = []
    for step in range(300):
        for i in range(len(lists)):
            roll = rng.random()
            if roll < 0.3:
                lists[i].extend(next(next_page) for _ in range(rng.randint(1, 3)))  # grows in place
            elif roll < 0.35:
                lists[i] = [next(next_page) for _ in range(rng.randint(0, 4))]  # other pages: a new list
        if step and rng.random() < 0.5 and all(any(b is x for x in lists) for b in batch):
            pass  # the same lists as the last step (the common decode step), some grown
        else:
            batch = rng.sample(lists, rng.randint(1, len(lists)))
            if rng.random() < 0.1:
                batch.append(batch[0])  # the same list twice in one step
        num_pages = [rng.randint(max(len(p) - 1, 0), len(p)) for p in batch]  # ahead steps read one page less
        assert _gather(tables, batch, num_pages) == _flat(batch, num_pages)
    assert tables.num_rows > 2


def test_a_row_whose_list_shrank_is_read_again() -> None:
    tables = PageTables()
    pages = [5, 6, 7]
    assert _gather(tables, [pages], [3]) == [5, 6, 7]
    del pages[1:]  # against the rule (lists only grow in place); still read right
    pages.append(9)
    assert _gather(tables, [pages], [2]) == [5, 9]


def test_rows_of_lists_no_step_uses_are_reused() -> None:
    tables = PageTables(num_rows=2, keep_steps=1)
    old = [[1], [2]]
    _gather(tables, old, [1, 1])
    for i in range(20):  # a new list every step: rows unused for a step are reused, the table stays small
        assert _gather(tables, [[3 + i]], [1]) == [3 + i]
    assert tables.num_rows <= 4
    assert _gather(tables, old, [1, 1]) == [1, 2]  # their rows went to others: copied again


def test_step_inputs_from_the_tables_equal_those_from_the_lists() -> None:
    rng = random.Random(1)
    tables = PageTables()
    page_size = 4
    lists = [list(range(i * 100, i * 100 + rng.randint(1, 9))) for i in range(7)]
    for is_decode in (True, False, True):
        starts, chunks = [], []
        for pages in lists:
            end = rng.randint((len(pages) - 1) * page_size + 1, len(pages) * page_size)
            fed = 1 if is_decode else rng.randint(1, end)
            starts.append(end - fed)
            chunks.append([rng.randint(0, 50) for _ in range(fed)])
        plain = build_step(is_decode, chunks, starts, lists, page_size)
        mirrored = build_step(is_decode, chunks, starts, lists, page_size, tables.gather)
        for name, value in vars(plain).items():
            assert np.array_equal(value, getattr(mirrored, name)), name
        for pages in lists:
            pages.append(pages[-1] + 1)


def test_a_decode_step_is_the_ragged_step_of_one_token_each() -> None:
    rng = random.Random(2)
    page_size = 4
    lists = [list(range(i * 100, i * 100 + rng.randint(1, 9))) for i in range(9)]
    starts = [rng.randint((len(p) - 1) * page_size, len(p) * page_size - 1) for p in lists]
    chunks = [[rng.randint(0, 50)] for _ in lists]
    decode = build_step(True, chunks, starts, lists, page_size)
    ragged = _ragged_step(True, chunks, starts, lists, page_size, None)
    for name, value in vars(ragged).items():
        got = getattr(decode, name)
        assert np.array_equal(value, got) and getattr(value, "dtype", None) == getattr(got, "dtype", None), name
