"""What one model forward step computes: a ragged batch of sequences.

A prefill step extends each sequence by many tokens, a decode step by exactly
one. Token ``i`` of a sequence lives in KV slot
``page_table[i // page_size] * page_size + i % page_size`` of every region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ForwardBatch:
    is_decode: bool
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    out_slots: torch.Tensor  # [num_tokens] KV slot of each new token
    seq_lens: list[int]  # KV length of each sequence after this step
    extend_lens: list[int]  # new tokens of each sequence in this step
    page_tables: list[list[int]]  # pages of each sequence, in order
    logits_indices: torch.Tensor  # [batch] position in input_ids of each sequence's last token
    attn: Any = field(default=None)  # backend-specific metadata set by prepare()

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def slots_for(page_table: list[int], start: int, end: int, page_size: int) -> list[int]:
    """KV slots of token positions ``[start, end)`` of a sequence."""
    return [page_table[i // page_size] * page_size + i % page_size for i in range(start, end)]


def build_forward_batch(
    is_decode: bool,
    token_chunks: list[list[int]],
    starts: list[int],
    page_tables: list[list[int]],
    page_size: int,
    device: torch.device,
) -> ForwardBatch:
    """Assemble a batch from each sequence's new tokens and their first position."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    last_indices: list[int] = []
    for chunk, start, table in zip(token_chunks, starts, page_tables):
        end = start + len(chunk)
        ids.extend(chunk)
        positions.extend(range(start, end))
        slots.extend(slots_for(table, start, end, page_size))
        last_indices.append(len(ids) - 1)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return ForwardBatch(
        is_decode=is_decode,
        input_ids=as_long(ids),
        positions=as_long(positions),
        out_slots=as_long(slots),
        seq_lens=[s + len(c) for s, c in zip(starts, token_chunks)],
        extend_lens=[len(c) for c in token_chunks],
        page_tables=page_tables,
        logits_indices=as_long(last_indices),
    )
