"""Benchmark prompts: random text, random token ids, ShareGPT, shared-prefix groups.

Each dataset is a builder registered by name that turns a ``DatasetSpec`` into a
list of ``BenchRequest`` (prompt, prompt length, output length). Random datasets
take their lengths either from ``--random-input-len``/``--random-output-len`` with
``--random-range-ratio`` or, when given, from a traffic scenario.

``--random-range-ratio r`` draws lengths uniformly from ``[len*(1-r), len*(1+r)]``
as vLLM does (0 gives exactly ``len``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pdserve.benchmarks.bench_tokenizer import Tokenizer, text_of_length
from pdserve.benchmarks.scenarios import Scenario
from pdserve.common.registry import Registry


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: a text prompt or token ids, and its lengths in tokens."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class DatasetSpec:
    name: str = "random"
    path: str | None = None
    num_prompts: int = 100
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    scenario: Scenario | None = None
    shared_prefix_num_groups: int = 4
    shared_prefix_len: int = 1024
    shared_prefix_suffix_len: int = 64
    sharegpt_output_len: int | None = None


# Each builder turns a spec into the requests to send; ``@DATASETS.register(name)`` adds one.
DatasetBuilder = Callable[[DatasetSpec, Tokenizer, np.random.Generator], list[BenchRequest]]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def length_summary(requests: list[BenchRequest]) -> dict[str, dict[str, float]]:
    """min, mean and max of the prompts' token lengths and the output lengths asked:
    the scenario a run really had (a normal scenario clips at one token, for one)."""
    def stats(values: list[int]) -> dict[str, float]:
        return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}

    return {"input_tokens": stats([r.prompt_len for r in requests]),
            "output_tokens": stats([r.output_len for r in requests])}


def build_dataset(spec: DatasetSpec, tokenizer: Tokenizer, seed: int) -> list[BenchRequest]:
    build = DATASETS.get(spec.name)  # an unknown name is a ValueError that lists the known ones
    if spec.scenario is not None and not spec.name.startswith("random"):
        raise ValueError("--traffic-scenario shapes random prompts: use --dataset random or random-ids")
    if spec.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    return build(spec, tokenizer, np.random.default_rng(seed))


def _ranged(length: int, ratio: float, rng: np.random.Generator, n: int) -> np.ndarray:
    low = max(1, int(length * (1 - ratio)))
    high = max(low, int(length * (1 + ratio)))
    return rng.integers(low, high, n, endpoint=True)


def _random_lengths(spec: DatasetSpec, rng: np.random.Generator) -> list[tuple[int, int]]:
    if spec.scenario is not None:
        return spec.scenario.sample(rng, spec.num_prompts)
    if not 0.0 <= spec.random_range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    inputs = _ranged(spec.random_input_len, spec.random_range_ratio, rng, spec.num_prompts)
    outputs = _ranged(spec.random_output_len, spec.random_range_ratio, rng, spec.num_prompts)
    return [(int(i), int(o)) for i, o in zip(inputs, outputs, strict=True)]


@DATASETS.register("random")
def _random_text(spec: DatasetSpec, tokenizer: Tokenizer, rng: np.random.Generator) -> list[BenchRequest]:
    requests = []
    for input_len, output_len in _random_lengths(spec, rng):
        text, actual_len = text_of_length(tokenizer, rng, input_len)
        requests.append(BenchRequest(prompt=text, prompt_len=actual_len, output_len=output_len))
    return requests


@DATASETS.register("random-ids")
def _random_ids(spec: DatasetSpec, tokenizer: Tokenizer, rng: np.random.Generator) -> list[BenchRequest]:
    if not tokenizer.exact:
        raise ValueError("--dataset random-ids needs the model's tokenizer (--tokenizer DIR)")
    return [
        BenchRequest(prompt=tokenizer.sample_ids(rng, i), prompt_len=i, output_len=o)
        for i, o in _random_lengths(spec, rng)
    ]


def _sharegpt_pairs(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    pairs = []
    for entry in entries:
        turns = entry.get("conversations") or entry.get("conversation") or []
        if len(turns) >= 2:
            pairs.append((str(turns[0].get("value", "")), str(turns[1].get("value", ""))))
    return pairs


@DATASETS.register("sharegpt")
def _sharegpt(spec: DatasetSpec, tokenizer: Tokenizer, rng: np.random.Generator) -> list[BenchRequest]:
    """First human turn as prompt, the reply's length as output length.

    Pairs shorter than 4 tokens on either side, longer than 1024 prompt tokens or
    2048 in total are skipped, as in vLLM's and SGLang's ShareGPT sampling.
    """
    if not spec.path:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
    pairs = _sharegpt_pairs(spec.path)
    requests: list[BenchRequest] = []
    for index in rng.permutation(len(pairs)):
        prompt, reply = pairs[index]
        prompt_len = len(tokenizer.encode(prompt))
        output_len = spec.sharegpt_output_len or len(tokenizer.encode(reply))
        if prompt_len < 4 or output_len < 4 or prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        requests.append(BenchRequest(prompt=prompt, prompt_len=prompt_len, output_len=output_len))
        if len(requests) == spec.num_prompts:
            return requests
    raise ValueError(f"{spec.path}: only {len(requests)} usable conversations, {spec.num_prompts} asked")


@DATASETS.register("shared-prefix")
def _shared_prefix(spec: DatasetSpec, tokenizer: Tokenizer, rng: np.random.Generator) -> list[BenchRequest]:
    """Groups of prompts that share one long system prefix, each with its own suffix.

    Prompts are dealt round-robin to the groups and then shuffled, so every group
    sees its prefix again while others are in flight (what a prefix cache serves).
    """
    if spec.shared_prefix_num_groups < 1:
        raise ValueError("--shared-prefix-num-groups must be >= 1")
    prefixes = [
        text_of_length(tokenizer, rng, spec.shared_prefix_len)
        for _ in range(spec.shared_prefix_num_groups)
    ]
    requests = []
    for i in range(spec.num_prompts):
        prefix, prefix_len = prefixes[i % len(prefixes)]
        suffix, suffix_len = text_of_length(tokenizer, rng, spec.shared_prefix_suffix_len)
        requests.append(
            BenchRequest(
                prompt=f"{prefix}\n\n{suffix}",
                prompt_len=prefix_len + suffix_len,
                output_len=spec.random_output_len,
            )
        )
    return [requests[i] for i in rng.permutation(len(requests))]
