"""What the model runner is asked to run: one scheduled step.

The scheduler (``engine/``) builds it; the runner reads only each request's
``pages``, so the runner depends on this shape, not on the engine's request type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class PagedRequest(Protocol):
    """The part of a request the runner touches: the KV pages that hold its tokens.

    ``pages`` only grows in place (append, extend); any other change assigns
    a new list. The runner mirrors each list across steps and relies on it
    (``model/page_tables.py``).
    """

    pages: list[int]


@dataclass
class ScheduledBatch:
    is_decode: bool
    reqs: list[PagedRequest]
    chunks: list[list[int]]  # tokens fed per request
    starts: list[int]  # position of each chunk's first token

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.chunks)
