"""Tokenizer loading, chat templates, and incremental detokenization.

The detokenizer never emits a partial UTF-8 character: a byte-level token that
ends mid-character decodes to U+FFFD, so text is held back until the character
completes (the prefix/read offset scheme used by vLLM and SGLang).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template) as f:
                chat_template = f.read()
        tokenizer.chat_template = chat_template
    return tokenizer


def max_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the UTF-8 bytes of the text one token stands for.

    A vocabulary entry's own spelling is never shorter than the normalized text
    it stands for (byte-level stand-ins and ``<0xNN>`` byte tokens are longer),
    so the longest entry bounds it. A normalizer may shrink text first (NFC joins
    up to three characters into one): then the bound is taken four times.
    """
    longest = max((len(piece.encode("utf-8", "replace")) for piece in tokenizer.get_vocab()), default=1) or 1
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return longest if backend is not None and backend.normalizer is None else 4 * longest


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    if not tokenizer.chat_template:
        raise ValueError("this model has no chat template; pass --chat-template or use /v1/completions")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for raw bytes, reversed (byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


_BYTE_DECODER = _byte_level_decoder()


def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    """The raw bytes of one token, which may be part of a UTF-8 character.

    ``decode([id])`` turns such a fragment into U+FFFD; clients rebuild characters
    from the bytes OpenAI logprobs report, so they must be the real ones.
    """
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if type(decoder).__name__ == "ByteLevel" and piece and all(c in _BYTE_DECODER for c in piece):
        return bytes(_BYTE_DECODER[c] for c in piece)
    return tokenizer.decode([token_id]).encode()


def ids_decoder(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
    """A function ids -> text equal to ``tokenizer.decode(ids, skip_special_tokens=...)``.

    For a fast tokenizer it calls the Rust decoder directly: the Python wrapper
    around it costs ~10 us a call, and the front decodes twice per streamed token.
    The wrapper's one other step, cleaning up spaces, is kept where it applies.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    decode = backend.decode
    if not _cleans_up_spaces(tokenizer, backend):
        return lambda ids: decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.clean_up_tokenization(decode(ids, skip_special_tokens=skip_special_tokens))


def _cleans_up_spaces(tokenizer: PreTrainedTokenizerBase, backend: object) -> bool:
    """Whether ``tokenizer.decode`` cleans up spaces (transformers skips it for BPE models)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    return type(backend.model).__name__ != "BPE" or bool(forced)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True,
                 decode: Callable[[list[int]], str] | None = None):
        self._decode = decode or ids_decoder(tokenizer, skip_special_tokens)
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (maybe empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back."""
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return full_text[len(prefix_text) :]
