"""The sampler: greedy, filters, penalties, seeds and logprobs, each as defined."""

from __future__ import annotations

import math

import pytest
import torch
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.sampler import Sampler, _filtered_probs

CPU = torch.device("cpu")
LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def sample(logits: torch.Tensor, params: list[SamplingParams], histories=None, seed: int = 0):
    histories = histories or [([1], []) for _ in params]
    return Sampler(seed, CPU).sample(logits, params, histories)


def test_greedy_takes_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)]
    for seed in range(5):
        assert sample(logits, params, seed=seed).token_ids == [1, 0]
    assert all(p.is_greedy for p in params)


def test_temperature_scales_logits() -> None:
    probs = _filtered_probs(LOGITS.view(1, -1), [SamplingParams(temperature=2.0)])
    assert torch.allclose(probs[0], torch.softmax(LOGITS / 2.0, dim=-1))


def test_top_k_keeps_k_best() -> None:
    probs = _filtered_probs(LOGITS.view(1, -1), [SamplingParams(top_k=2)])[0]
    assert probs[2:].sum() == 0
    assert torch.allclose(probs[:2], torch.tensor([0.5, 0.3]) / 0.8)


@pytest.mark.parametrize(("top_p", "kept"), [(1.0, 4), (0.9, 3), (0.7, 2), (0.5, 1), (0.01, 1)])
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, kept: int) -> None:
    probs = _filtered_probs(LOGITS.view(1, -1), [SamplingParams(top_p=top_p)])[0]
    assert (probs > 0).sum().item() == kept
    assert (probs[:kept] > 0).all() and math.isclose(probs.sum().item(), 1.0, rel_tol=1e-6)


def test_min_p_drops_tokens_below_fraction_of_best() -> None:
    probs = _filtered_probs(LOGITS.view(1, -1), [SamplingParams(min_p=0.35)])[0]
    # threshold 0.35 * 0.5 = 0.175: 0.3 stays, 0.15 and 0.05 go
    assert (probs > 0).tolist() == [True, True, False, False]


def test_filters_apply_per_row() -> None:
    logits = LOGITS.repeat(2, 1)
    probs = _filtered_probs(logits, [SamplingParams(top_k=1), SamplingParams()])
    assert (probs[0] > 0).sum() == 1 and (probs[1] > 0).sum() == 4


def test_draws_follow_the_distribution() -> None:
    rows = 4000
    result = sample(LOGITS.repeat(rows, 1), [SamplingParams()] * rows)
    freq = torch.bincount(torch.tensor(result.token_ids), minlength=4).float() / rows
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04), freq


def test_draws_respect_filters() -> None:
    rows = 500
    result = sample(LOGITS.repeat(rows, 1), [SamplingParams(top_k=2, temperature=5.0)] * rows)
    assert set(result.token_ids) == {0, 1}


def test_frequency_and_presence_penalties() -> None:
    logits = torch.zeros(1, 4)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, temperature=0.0)
    sampler = Sampler(0, CPU)
    out = sampler._apply_penalties(logits, [params], [([3], [1, 1, 2])])
    # token 1: 2 * 0.5 + 0.25; token 2: 0.5 + 0.25; the prompt's token 3 is not penalised.
    assert out[0].tolist() == [0.0, -1.25, -0.75, 0.0]
    assert logits.abs().sum() == 0  # the caller's logits are untouched


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    params = SamplingParams(repetition_penalty=2.0, temperature=0.0)
    out = Sampler(0, CPU)._apply_penalties(logits, [params], [([0], [1])])
    assert out[0].tolist() == [1.0, -4.0, 2.0, -2.0]


def test_logit_bias_bans_and_forces_per_row() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0], [3.0, 2.5, 0.0], [3.0, 2.5, 0.0]])
    params = [SamplingParams(temperature=0.0, logit_bias_ids=(0,), logit_bias_values=(-100.0,)),
              SamplingParams(temperature=0.0, logit_bias_ids=(2, 1), logit_bias_values=(100.0, -1.0)),
              SamplingParams(temperature=0.0)]
    assert not any(p.argmax_only for p in params[:2]) and params[2].argmax_only
    assert sample(logits, params).token_ids == [1, 2, 0]
    assert logits[0].tolist() == [3.0, 2.5, 0.0]  # the caller's logits are untouched
    # Sampled rows see the bias too: a banned token is never drawn.
    banned = SamplingParams(temperature=1.0, logit_bias_ids=(0, 1), logit_bias_values=(-100.0, -100.0))
    assert {sample(logits[:1], [banned], seed=s).token_ids[0] for s in range(20)} == {2}
    # An id past the row (the front refuses it) is dropped, not a failed step for the whole batch.
    stray = SamplingParams(temperature=0.0, logit_bias_ids=(1, 3), logit_bias_values=(100.0, 100.0))
    assert sample(logits[:1], [stray]).token_ids == [1]


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    plain = sample(logits, [SamplingParams(temperature=0.0)], [([5], [0, 0])])
    penalised = sample(logits, [SamplingParams(temperature=0.0, frequency_penalty=0.5)], [([5], [0, 0])])
    assert (plain.token_ids, penalised.token_ids) == ([0], [1])


def test_seeded_draws_are_reproducible_and_batch_independent() -> None:
    logits = torch.zeros(3, 50)
    seeded = SamplingParams(seed=42)
    history = ([1], [4, 5])
    alone = sample(logits[:1], [seeded], [history], seed=1).token_ids[0]
    batched = sample(logits, [SamplingParams(), seeded, SamplingParams(seed=7)], [([1], [])] + [history] * 2, seed=2)
    assert batched.token_ids[1] == alone
    # The step (number of outputs so far) is part of the seed, so a run is not one repeated token.
    steps = {sample(logits[:1], [seeded], [([1], [0] * n)]).token_ids[0] for n in range(20)}
    assert len(steps) > 5
    seeds = {sample(logits[:1], [SamplingParams(seed=s)], [history]).token_ids[0] for s in range(20)}
    assert len(seeds) > 5


def test_logprobs_are_raw_log_softmax() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    params = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2, repetition_penalty=2.0)]
    result = sample(logits, params, [([2], [])])
    raw = torch.log_softmax(logits[0], dim=-1)
    # The penalty moved the choice from 2 to 1; the reported numbers are still the model's own.
    assert result.token_ids == [1]
    assert math.isclose(result.logprobs[0], raw[1].item(), rel_tol=1e-6)
    assert [t for t, _ in result.top_logprobs[0]] == [2, 1]
    assert math.isclose(result.top_logprobs[0][0][1], raw[2].item(), rel_tol=1e-6)


def test_top_logprobs_count_per_request() -> None:
    logits = torch.randn(2, 10)
    params = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3), SamplingParams(temperature=0.0, logprobs=True)]
    result = sample(logits, params)
    assert [len(t) for t in result.top_logprobs] == [3, 0]
    assert sample(logits, [SamplingParams(), SamplingParams()]).logprobs is None


def test_two_pass_argmax_matches_torch_including_ties_and_nan() -> None:
    from pdserve.engine.sampler import two_pass_argmax

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 1203, generator=g)
    logits[1, 7] = logits[1, 900] = 50.0  # a tie across chunks: the first wins
    logits[2, 310] = logits[2, 305] = 60.0  # a tie inside a chunk
    logits[3, :] = -1.0  # every value tied
    logits[4, 640] = float("nan")  # torch treats NaN as the maximum
    logits[5, 1201] = 70.0  # the maximum in the remainder past the last whole chunk
    logits[6, 20] = logits[6, 1202] = 80.0  # tied with the remainder: the chunk (lower index) wins
    logits[7, 1200] = float("nan")  # NaN only in the remainder
    for chunks in (4, 12, 100, 401):  # 1203 = 3 x 401: some leave a remainder, one does not
        assert two_pass_argmax(logits, chunks).tolist() == logits.argmax(-1).tolist(), chunks
    sliced = torch.randn(3, 1300, generator=g)[:, :1201]  # a vocabulary cut to the tokenizer's
    assert two_pass_argmax(sliced, 8).tolist() == sliced.argmax(-1).tolist()


def test_min_new_tokens_holds_back_eos_and_stop_ids_until_reached() -> None:
    """EOS (id 0 here) and a request's stop ids cannot be drawn while fewer than
    min_new_tokens tokens are out, whatever the bias; from then on they can."""
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0]])
    sampler = Sampler(0, CPU, eos_ids=(0,))
    held = SamplingParams(temperature=0.0, min_new_tokens=2, stop_token_ids=(1,))
    assert not held.argmax_only
    assert sampler.sample(logits, [held], [([7], [])]).token_ids == [2]
    assert sampler.sample(logits, [held], [([7], [5])]).token_ids == [2]
    assert sampler.sample(logits, [held], [([7], [5, 5])]).token_ids == [0]
    forced = SamplingParams(temperature=0.0, min_new_tokens=1, logit_bias_ids=(0,), logit_bias_values=(100.0,))
    assert sampler.sample(logits, [forced], [([7], [])]).token_ids == [1]
    # ignore_eos: EOS does not end the output, so it is not held back.
    free_eos = SamplingParams(temperature=0.0, min_new_tokens=2, ignore_eos=True)
    assert sampler.sample(logits, [free_eos], [([7], [])]).token_ids == [0]
    drawn = SamplingParams(temperature=5.0, min_new_tokens=1, stop_token_ids=(1,))
    assert {sampler.sample(logits, [drawn], [([7], [])]).token_ids[0] for _ in range(30)} <= {2, 3}


def test_only_plain_greedy_requests_are_argmax_only_and_the_flag_stays_off_the_wire() -> None:
    from pdserve.common import codec

    plain = SamplingParams(temperature=0.0, max_new_tokens=3, stop_token_ids=(5,))
    others = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0, logprobs=True),
              SamplingParams(temperature=0.0, repetition_penalty=1.2), SamplingParams(top_k=1, presence_penalty=0.5)]
    assert plain.argmax_only and SamplingParams(temperature=1.0, top_k=1).argmax_only
    assert not any(p.argmax_only for p in others)
    wire = codec.encode(plain)
    assert b"argmax_only" not in wire and codec.decode(wire) == plain


def test_a_plain_greedy_batch_and_a_mixed_one_draw_the_same_greedy_tokens() -> None:
    """The argmax-only batch skips the general draw; a greedy row's token is
    the argmax either way, and the other rows keep their own sampling."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    greedy = [SamplingParams(temperature=0.0)] * 6
    mixed = greedy[:3] + [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2),
                          SamplingParams(temperature=0.0, frequency_penalty=0.0, repetition_penalty=1.0, seed=4),
                          SamplingParams(temperature=0.9, seed=1)]
    plain = sample(logits, greedy)
    assert plain.token_ids == logits.argmax(-1).tolist() and plain.logprobs is None
    got = sample(logits, mixed)
    assert got.token_ids[:5] == plain.token_ids[:5] and got.logprobs is not None


def test_bf16_logits_sample_as_their_float32_copy() -> None:
    """The model hands over logits in its own dtype; the sampler's answers
    are those of the exact float32 copy: argmax as is, everything else widened
    first (log-softmax, filters and penalties in bf16 would round)."""
    logits = (torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 8).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0.7, top_p=0.9, seed=5), SamplingParams(temperature=1.0, repetition_penalty=1.3,
                                                                                 seed=6)]
    histories = [([1, 2], [3]) for _ in params]
    got, want = sample(logits, params, histories), sample(logits.float(), params, histories)
    assert got.token_ids == want.token_ids
    assert got.logprobs == want.logprobs and got.top_logprobs == want.top_logprobs
    greedy = [SamplingParams(temperature=0.0)] * 4
    assert sample(logits, greedy).token_ids == logits.float().argmax(-1).tolist()
