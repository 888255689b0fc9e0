"""Traffic-scenario parsing and sampling, arrival-time generation, dataset building."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pdserve.benchmarks.arrivals import arrival_offsets_s
from pdserve.benchmarks.bench_tokenizer import ApproxTokenizer, text_of_length
from pdserve.benchmarks.datasets import DatasetSpec, build_dataset
from pdserve.benchmarks.scenarios import ScenarioError, parse_scenario


def test_deterministic_scenario() -> None:
    s = parse_scenario("D(2048,256)")
    assert (s.kind, s.params, s.label) == ("D", (2048.0, 256.0), "D(2048,256)")
    assert s.sample(np.random.default_rng(0), 3) == [(2048, 256)] * 3
    assert parse_scenario(" D( 100 , 5 ) ").label == "D(100,5)"


def test_normal_scenario_matches_its_moments() -> None:
    s = parse_scenario("N(1024,256)/(256,128)")
    assert s.label == "N(1024,256)/(256,128)"
    pairs = np.array(s.sample(np.random.default_rng(1), 20000))
    assert pairs[:, 0].mean() == pytest.approx(1024, rel=0.02)
    assert pairs[:, 0].std() == pytest.approx(256, rel=0.05)
    assert pairs[:, 1].mean() == pytest.approx(256, rel=0.03)
    assert pairs.min() >= 1  # clipped: a normal draw can go below one token
    assert pairs.dtype.kind == "i"


def test_uniform_scenario_covers_both_ends() -> None:
    pairs = np.array(parse_scenario("U(10,12)/(1,3)").sample(np.random.default_rng(2), 3000))
    assert set(pairs[:, 0]) == {10, 11, 12}
    assert set(pairs[:, 1]) == {1, 2, 3}


@pytest.mark.parametrize(
    "text",
    ["", "D(1)", "D(1,2,3)", "X(1,2)", "N(1,2)", "U(1,2)", "D(a,b)", "D(0,5)", "U(5,1)/(1,2)",
     "D(1.5,2)", "N(100,10)/(0,1)", "D(1,2)/(3,4)"],
)
def test_bad_scenarios_are_refused_with_the_forms(text: str) -> None:
    with pytest.raises(ScenarioError, match=r"traffic scenario"):
        parse_scenario(text)


def test_bad_scenario_message_names_the_accepted_forms() -> None:
    with pytest.raises(ScenarioError, match=r"D\(in,out\).*N\(.*U\("):
        parse_scenario("Z(1,2)")


def test_poisson_arrivals_have_rate_and_exponential_spread() -> None:
    offsets = arrival_offsets_s(20001, 10.0, 1.0, np.random.default_rng(0))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_arrivals_keep_the_rate_and_set_the_spread(burstiness: float) -> None:
    gaps = np.diff(arrival_offsets_s(20001, 5.0, burstiness, np.random.default_rng(3)))
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_arrivals_are_reproducible_and_infinite_rate_sends_at_once() -> None:
    a = arrival_offsets_s(50, 3.0, 1.0, np.random.default_rng(7))
    b = arrival_offsets_s(50, 3.0, 1.0, np.random.default_rng(7))
    assert a == b and a == sorted(a)
    assert arrival_offsets_s(4, math.inf, 1.0, np.random.default_rng(0)) == [0.0] * 4
    with pytest.raises(ValueError):
        arrival_offsets_s(4, 0.0, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError):
        arrival_offsets_s(4, 1.0, 0.0, np.random.default_rng(0))


def test_random_dataset_follows_the_scenario() -> None:
    tok = ApproxTokenizer()
    spec = DatasetSpec(name="random", num_prompts=5, scenario=parse_scenario("D(40,7)"))
    requests = build_dataset(spec, tok, seed=0)
    assert [(r.prompt_len, r.output_len) for r in requests] == [(40, 7)] * 5
    assert all(len(tok.encode(r.prompt)) == 40 for r in requests)
    assert build_dataset(spec, tok, seed=0) == requests  # same seed, same prompts


def test_random_range_ratio_bounds_lengths() -> None:
    spec = DatasetSpec(name="random", num_prompts=200, random_input_len=100,
                       random_output_len=10, random_range_ratio=0.5)
    requests = build_dataset(spec, ApproxTokenizer(), seed=1)
    inputs = [r.prompt_len for r in requests]
    assert min(inputs) >= 50 and max(inputs) <= 150 and len(set(inputs)) > 20


def test_shared_prefix_groups_share_their_prefix() -> None:
    spec = DatasetSpec(name="shared-prefix", num_prompts=12, shared_prefix_num_groups=3,
                       shared_prefix_len=30, shared_prefix_suffix_len=5, random_output_len=4)
    requests = build_dataset(spec, ApproxTokenizer(), seed=0)
    prefixes = {r.prompt.split("\n\n")[0] for r in requests}
    assert len(prefixes) == 3
    assert all(r.prompt_len == 35 and r.output_len == 4 for r in requests)


def test_sharegpt_takes_first_turns(tmp_path: object) -> None:
    path = tmp_path / "sg.json"  # type: ignore[operator]
    convo = [{"conversations": [{"from": "human", "value": "tell me a story about the sea " * 2},
                                {"from": "gpt", "value": "once upon a time there was a boat"}]}]
    path.write_text(__import__("json").dumps(convo * 3 + [{"conversations": [{"from": "human", "value": "hi"}]}]))
    spec = DatasetSpec(name="sharegpt", path=str(path), num_prompts=2)
    requests = build_dataset(spec, ApproxTokenizer(), seed=0)
    assert [(r.prompt_len, r.output_len) for r in requests] == [(14, 8), (14, 8)]
    with pytest.raises(ValueError, match="usable"):
        build_dataset(DatasetSpec(name="sharegpt", path=str(path), num_prompts=5), ApproxTokenizer(), 0)


def test_dataset_misuse_is_refused() -> None:
    tok = ApproxTokenizer()
    with pytest.raises(ValueError, match="random-ids"):
        build_dataset(DatasetSpec(name="random-ids", num_prompts=1), tok, 0)
    with pytest.raises(ValueError, match="traffic-scenario"):
        build_dataset(DatasetSpec(name="shared-prefix", scenario=parse_scenario("D(1,1)")), tok, 0)
    with pytest.raises(ValueError, match="dataset-path"):
        build_dataset(DatasetSpec(name="sharegpt"), tok, 0)


def test_text_of_length_is_exact_for_the_word_tokenizer() -> None:
    text, n = text_of_length(ApproxTokenizer(), np.random.default_rng(0), 123)
    assert n == 123 and len(text.split()) == 123
