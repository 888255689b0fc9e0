"""Incremental detokenization and stop strings: streamed text is exactly the decoded text."""

from __future__ import annotations

import random

import pytest
from pdserve.common.messages import TokenOutput
from pdserve.server.text_stream import TextStream
from pdserve.server.tokenizer import (
    IncrementalDetokenizer,
    apply_chat_template,
    load_tokenizer,
    token_bytes,
)

REPLACEMENT = "\ufffd"
TEXTS = [
    "Emoji: 🙂 😀 😂 🚀 🎉 👍🏽 👩‍💻 🏳️‍🌈 🇯🇵",
    "中文：你好，世界。今天天气很好。日本語：こんにちは、世界。한국어: 안녕하세요",
    "Mixed ✨ café naïve 1️⃣ Ελληνικά Привет 🐍 end",
    "Rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 🧿 and plain ascii",
]


@pytest.fixture(scope="module")
def tokenizer(model_dir: str):
    return load_tokenizer(model_dir)


def stream_deltas(tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    return deltas + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_never_stream_replacement_chars(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The test means something only if some token ends inside a character.
    assert any(tokenizer.decode([t]).endswith(REPLACEMENT) for t in ids)
    deltas = stream_deltas(tokenizer, ids)
    assert all(REPLACEMENT not in d for d in deltas), deltas
    assert "".join(deltas) == tokenizer.decode(ids) == text


def test_random_ids_concatenate_to_the_full_decode(tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(4, tokenizer.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream_deltas(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_are_the_raw_utf8(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [token_bytes(tokenizer, t) for t in ids]
    assert b"".join(pieces) == text.encode()
    assert any(not _is_utf8(p) for p in pieces)  # fragments of characters, not U+FFFD
    assert token_bytes(tokenizer, tokenizer.eos_token_id) == tokenizer.eos_token.encode()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_special_tokens_are_skipped(tokenizer) -> None:
    ids = tokenizer.encode("hello") + [tokenizer.eos_token_id]
    assert "".join(stream_deltas(tokenizer, ids)) == "hello"


def test_chat_template_matches_transformers(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 🙂"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert apply_chat_template(tokenizer, messages) == list(expected)
    assert apply_chat_template(tokenizer, messages).count(tokenizer.bos_token_id) == 1


def feed_all(tokenizer, ids: list[int], stop: tuple[str, ...], chunk: int = 1) -> tuple[list[str], str | None, object]:
    """Feed ids in chunks as the engine would; return text deltas and the finish."""
    stream = TextStream(IncrementalDetokenizer(tokenizer), stop)
    deltas = []
    for i in range(0, len(ids), chunk):
        last = i + chunk >= len(ids)
        delta = stream.feed([TokenOutput(rid="r", token_ids=ids[i : i + chunk], finish_reason="length" if last else None)])
        deltas.append(delta.text)
        if delta.finish_reason is not None:
            return deltas, delta.finish_reason, delta.matched_stop
    return deltas, None, None


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_stop_string_cuts_exactly_and_never_leaks(tokenizer, chunk: int) -> None:
    text = "The quick brown fox jumps over the lazy dog. Call me Ishmael."
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, finish, matched = feed_all(tokenizer, ids, ("lazy dog", "never there"), chunk)
    assert (finish, matched) == ("stop", "lazy dog")
    assert "".join(deltas) == "The quick brown fox jumps over the "
    assert not any("lazy" in d for d in deltas)


def test_partial_stop_is_released_when_it_does_not_complete(tokenizer) -> None:
    text = "the lazy cat, not the lazy dog"
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, finish, _ = feed_all(tokenizer, ids, ("lazy dog!",))
    assert finish == "length"
    assert "".join(deltas) == text


def test_earliest_stop_string_wins(tokenizer) -> None:
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    deltas, finish, matched = feed_all(tokenizer, ids, ("four", "two"), chunk=100)
    assert (finish, matched, "".join(deltas)) == ("stop", "two", "one ")


def test_stop_string_across_multibyte_tokens(tokenizer) -> None:
    ids = tokenizer.encode("Emoji: 🙂 😀 😂 🚀 done", add_special_tokens=False)
    deltas, finish, matched = feed_all(tokenizer, ids, ("😂",))
    assert (finish, matched, "".join(deltas)) == ("stop", "😂", "Emoji: 🙂 😀 ")
    assert all(REPLACEMENT not in d for d in deltas)
