"""Random benchmark prompts have exactly the asked token length with the built-in tokenizer.

Random ids decoded to text and encoded again can come back longer (a byte-level
token holding part of a UTF-8 character decodes to U+FFFD, three bytes of its own)
or shorter (neighbours merge); prompts are drawn from whole-character tokens and
trimmed or topped up until the round trip is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
from pdserve.benchmarks.bench_tokenizer import HFTokenizer, text_of_length
from pdserve.benchmarks.datasets import DatasetSpec, build_dataset, length_summary
from pdserve.benchmarks.scenarios import parse_scenario


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    from pdserve.model.builtin import ensure_builtin_model

    return HFTokenizer.load(ensure_builtin_model("tiny"))


def test_every_length_from_1_to_300_is_exact(tokenizer: HFTokenizer) -> None:
    rng = np.random.default_rng(1)
    wrong = {}
    for n in range(1, 301):
        text, actual = text_of_length(tokenizer, rng, n)
        if (actual, len(tokenizer.encode(text))) != (n, n):
            wrong[n] = actual
    assert wrong == {}


@pytest.mark.parametrize("scenario", ["D(128,4)", "D(2000,1)", "U(1,512)/(1,8)", "N(256,200)/(8,2)"])
def test_random_dataset_prompts_have_the_scenario_lengths(tokenizer: HFTokenizer, scenario: str) -> None:
    num_prompts, seed = 30 if scenario != "D(2000,1)" else 5, 7
    spec = DatasetSpec(name="random", num_prompts=num_prompts, scenario=parse_scenario(scenario))
    asked = parse_scenario(scenario).sample(np.random.default_rng(seed), num_prompts)
    requests = build_dataset(spec, tokenizer, seed)
    got = [(len(tokenizer.encode(r.prompt)), r.output_len) for r in requests]
    assert got == asked
    assert [r.prompt_len for r in requests] == [n for n, _ in asked]
    summary = length_summary(requests)
    assert summary["input_tokens"]["min"] == min(n for n, _ in asked)
    assert summary["input_tokens"]["max"] == max(n for n, _ in asked)
