"""Tokenizers for the benchmark client: a Hugging Face tokenizer, or an approximation.

The client needs a tokenizer to build prompts of a given token length and to count
output tokens when a server reports no ``usage``. With no tokenizer directory at
hand it falls back to ``ApproxTokenizer``, which counts words and punctuation marks:
lengths are then only estimates of the server's token counts, and the caller warns.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

_WORD_RE = re.compile(r"\w+|[^\w\s]")
# Short common words: prompts built from them read as text and count as one
# approximate token each.
_WORDS = (
    "the of and to in is was for on are with as by at from this have not but had "
    "his they were one all we can her has there been if more when will would who "
    "so no out up into do than time only new some could these two may first then "
    "any like now my over such our man me even most made after also did many off "
    "before must well back through years much where your way down should because "
    "long each just people"
).split()
_WORD_INDEX = {word: i for i, word in enumerate(_WORDS)}
MAX_LENGTH_ROUNDS = 32  # trim/top-up rounds of text_of_length


class Tokenizer(Protocol):
    name: str
    exact: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def sample_ids(self, rng: np.random.Generator, n: int) -> list[int]: ...


@dataclass
class HFTokenizer:
    """A Hugging Face tokenizer; encodes without special tokens (the server adds them)."""

    inner: Any
    name: str
    exact: bool = True
    # Ids random prompts draw from, computed once: see ``_whole_ids``.
    _plain_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def load(cls, path: str) -> HFTokenizer:
        from transformers import AutoTokenizer

        inner = AutoTokenizer.from_pretrained(path)
        return cls(inner=inner, name=path, _plain_ids=_whole_ids(inner))

    def encode(self, text: str) -> list[int]:
        return list(self.inner.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.inner.decode(ids, skip_special_tokens=False))

    def sample_ids(self, rng: np.random.Generator, n: int) -> list[int]:
        return rng.choice(self._plain_ids, size=n).tolist()


@dataclass
class ApproxTokenizer:
    """Counts words and punctuation marks as tokens; decodes ids to common words."""

    name: str = "approx-words"
    exact: bool = False

    def encode(self, text: str) -> list[int]:
        return [_word_id(piece) for piece in _WORD_RE.findall(text)]

    def decode(self, ids: list[int]) -> str:
        return " ".join(_WORDS[i % len(_WORDS)] for i in ids)

    def sample_ids(self, rng: np.random.Generator, n: int) -> list[int]:
        return rng.integers(0, len(_WORDS), n).tolist()


def _whole_ids(inner: Any) -> np.ndarray:
    """Ids that are no special token, decode alone to whole characters and encode back to
    themselves. A byte-level token holding part of a UTF-8 character decodes to U+FFFD,
    which encodes to other tokens: prompts drawn from such ids re-encode longer than
    asked, and trimming them cuts further characters in half."""
    special = set(inner.all_special_ids)
    candidates = [i for i in range(len(inner)) if i not in special]
    texts = inner.batch_decode([[i] for i in candidates], skip_special_tokens=False)
    encoded = inner(texts, add_special_tokens=False)["input_ids"] if candidates else []
    whole = [i for i, text, ids in zip(candidates, texts, encoded, strict=True)
             if text and "\ufffd" not in text and list(ids) == [i]]
    return np.array(whole or candidates, dtype=np.int64)


def _word_id(piece: str) -> int:
    known = _WORD_INDEX.get(piece)
    return known if known is not None else zlib.crc32(piece.encode()) % len(_WORDS)


def load_tokenizer(path: str | None) -> Tokenizer:
    """The HF tokenizer at ``path`` when it is a local directory, else the approximation."""
    if path and Path(path).is_dir():
        return HFTokenizer.load(path)
    return ApproxTokenizer()


def text_of_length(tokenizer: Tokenizer, rng: np.random.Generator, num_tokens: int) -> tuple[str, int]:
    """Text that re-encodes to ``num_tokens`` tokens, and its actual token count.

    Decoding random ids and encoding the text again can merge neighbouring tokens,
    so the ids are trimmed or topped up until the round trip is exact (drawn from
    whole-character tokens, it is exact after one or two rounds).
    """
    ids = tokenizer.sample_ids(rng, num_tokens)
    text = tokenizer.decode(ids)
    for _ in range(MAX_LENGTH_ROUNDS):
        ids = tokenizer.encode(text)
        if len(ids) == num_tokens:
            break
        if len(ids) > num_tokens:
            ids = ids[:num_tokens]
        else:
            ids = ids + tokenizer.sample_ids(rng, num_tokens - len(ids))
        text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text))
