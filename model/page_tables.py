"""Requests' KV page lists, mirrored in one numpy block table across steps.

Every paged attention kernel reads a step's page index: each request's
pages, concatenated (``kv_indices``). Flattened from the page lists every
step, it is a walk over every page of every request in Python (12k ints at
batch 256 and 768 tokens: most of a decode step's host time). The lists
barely change between steps, so each is mirrored in a row of an int32 table
and a step's index is one vectorised gather of those rows.

A page list only grows while it is the same list object (the scheduler
extends it; whoever gives a request other pages assigns a new list:
``model.batch.PagedRequest``). A row therefore stays valid while it mirrors
the same list, and takes only the new tail when the list grew. Each row
holds its list, so no other list can take its id while it is mirrored; rows
no step used lately are reused.
"""

from __future__ import annotations

import operator

import numpy as np


class PageTables:
    """Rows of page ids, one per page list a recent step used."""

    def __init__(self, num_rows: int = 64, width: int = 64, keep_steps: int = 4):
        self._table = np.zeros((num_rows, width), dtype=np.int32)
        self._cols = np.arange(width)
        self._row_of: dict[int, int] = {}  # id of a list -> its row
        self._lists: list[list[int] | None] = [None] * num_rows  # the list each row mirrors
        self._lengths = np.zeros(num_rows, dtype=np.int64)  # pages of its list a row holds
        self._used = np.zeros(num_rows, dtype=np.int64)  # the last step that used each row
        self._free = list(range(num_rows - 1, -1, -1))
        self._step = 0
        self.keep_steps = keep_steps  # steps a row outlives its last use
        # The last step's lists and rows: a decode step usually asks for the same lists again.
        self._last: tuple[list[list[int]], np.ndarray] = ([], np.zeros(0, dtype=np.intp))

    @property
    def num_rows(self) -> int:
        return self._table.shape[0]

    def gather(self, page_lists: list[list[int]], num_pages: np.ndarray) -> np.ndarray:
        """``page_lists[i][:num_pages[i]]`` for every ``i``, concatenated (int32)."""
        rows = self._rows(page_lists)
        width = int(num_pages.max(initial=0))
        block = self._table[rows, :width]
        return block[self._cols[:width] < num_pages[:, None]]

    def _rows(self, page_lists: list[list[int]]) -> np.ndarray:
        """Each list's row, brought up to date. The common step finds every
        list with a row, a few of them longer: C-speed passes and numpy."""
        self._step += 1
        last_lists, found = self._last
        if not (len(page_lists) == len(last_lists) and all(map(operator.is_, page_lists, last_lists))):
            rows = list(map(self._row_of.get, map(id, page_lists)))
            if None in rows:
                found = self._rows_with_new(page_lists, rows)
                self._last = (list(page_lists), found)
                return found
            found = np.array(rows, dtype=np.intp)
            self._last = (list(page_lists), found)
        self._used[found] = self._step
        lengths = np.fromiter(map(len, page_lists), dtype=np.int64, count=len(page_lists))
        for i in np.flatnonzero(lengths != self._lengths[found]).tolist():
            self._update(int(found[i]), page_lists[i])
        return found

    def _rows_with_new(self, page_lists: list[list[int]], rows: list[int | None]) -> np.ndarray:
        """:meth:`_rows` when some lists have no row yet."""
        known = [row for row in rows if row is not None]
        self._used[known] = self._step  # this step's rows are not reused for its new lists
        for i, (pages, row) in enumerate(zip(page_lists, rows)):
            if row is None:
                row = self._row_of.get(id(pages))  # the same list twice in one step: one row
                rows[i] = self._assign(pages) if row is None else row
            elif self._lengths[row] != len(pages):
                self._update(row, pages)
        return np.array(rows, dtype=np.intp)

    def _update(self, row: int, pages: list[int]) -> None:
        """A row's list changed length: it grew (copy the tail) or, against
        the rule, shrank (copy it whole)."""
        held = int(self._lengths[row])
        self._write(row, pages, held if held < len(pages) else 0)

    def _assign(self, pages: list[int]) -> int:
        """A row for a list no row mirrors yet."""
        if not self._free:
            self._release_stale()
        if not self._free:
            self._grow_rows()
        row = self._free.pop()
        self._row_of[id(pages)] = row
        self._lists[row] = pages
        self._used[row] = self._step
        self._write(row, pages, 0)
        return row

    def _write(self, row: int, pages: list[int], start: int) -> None:
        """Copy ``pages[start:]`` into ``row`` (the table widens to fit)."""
        if len(pages) > self._table.shape[1]:
            self._grow_width(len(pages))
        self._table[row, start : len(pages)] = pages[start:]
        self._lengths[row] = len(pages)

    def _release_stale(self) -> None:
        """Free the rows no step used in the last ``keep_steps`` steps."""
        for row in np.flatnonzero(self._used < self._step - self.keep_steps).tolist():
            pages = self._lists[row]
            if pages is not None:
                self._row_of.pop(id(pages), None)
                self._lists[row] = None
                self._lengths[row] = 0
                self._free.append(row)

    def _grow_rows(self) -> None:
        old = self.num_rows
        self._table = np.concatenate([self._table, np.zeros_like(self._table)])
        self._used = np.concatenate([self._used, np.zeros(old, dtype=np.int64)])
        self._lists += [None] * old
        self._lengths = np.concatenate([self._lengths, np.zeros(old, dtype=np.int64)])
        self._free += range(2 * old - 1, old - 1, -1)

    def _grow_width(self, needed: int) -> None:
        width = self._table.shape[1]
        while width < needed:
            width *= 2
        table = np.zeros((self.num_rows, width), dtype=np.int32)
        table[:, : self._table.shape[1]] = self._table
        self._table, self._cols = table, np.arange(width)
