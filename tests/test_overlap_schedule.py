"""The overlap schedule: decode step N+1 launched before step N's tokens reach
the host (``ModelRunner.launch_ahead``), and the pool's fences that keep the
pages it writes from being reused under it.

The engine turns it on for CUDA only; here it is switched on for a CPU engine,
where the steps run synchronously but take exactly the same path, and its
outputs are compared with the serial schedule's.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import defaultdict

import numpy as np
import pytest
import torch
from pdserve.common import codec
from pdserve.common.config import ServerConfig
from pdserve.common.kv_layout import KVLayout
from pdserve.common.messages import GenerateRequest
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.engine import Engine
from pdserve.model.kernels.step_inputs import feed_tokens
from pdserve.model.kv_pool import KVPool


class _Guard:
    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def _pool(num_pages: int = 8) -> KVPool:
    return KVPool(KVLayout(num_layers=1, num_pages=num_pages, page_size=4, num_kv_heads=1, head_dim=2, dtype="float32"), torch.float32, torch.device("cpu"))


def test_a_fenced_page_released_meanwhile_waits_for_its_step() -> None:
    pool = _pool()
    a, b = pool.alloc(1), pool.alloc(1)
    guard = _Guard()
    pool.fence(a + b, guard)
    pool.release(a)
    assert pool.num_free_pages == 6 and pool.num_parked_pages == 1
    pool.reclaim()  # the step is still running: nothing moves
    assert pool.num_free_pages == 6 and a[0] not in pool.alloc(6)
    guard.done = True
    pool.reclaim()
    assert pool.num_free_pages == 1 and pool.num_parked_pages == 0
    assert pool.alloc(1) == a
    pool.release(b)  # no longer fenced: straight back to the free list
    assert pool.num_free_pages == 1


def test_a_page_fenced_again_waits_for_the_newer_step() -> None:
    pool = _pool()
    (page,) = pool.alloc(1)
    first, second = _Guard(), _Guard()
    pool.fence([page], first)
    pool.fence([page], second)
    pool.release([page])
    first.done = True
    pool.reclaim()
    assert pool.num_parked_pages == 1
    second.done = True
    pool.reclaim()
    assert pool.num_parked_pages == 0 and pool.num_free_pages == 8


def test_each_fence_lifts_its_own_pages_whenever_its_step_ends() -> None:
    """A page waits for the newest fence on it; a fenced page still in use
    stays in use when its fence lifts."""
    pool = _pool()
    a, b, c, held = pool.alloc(1), pool.alloc(1), pool.alloc(1), pool.alloc(1)
    first, second = _Guard(), _Guard()
    pool.fence(a + b + held, first)
    pool.fence(b + c, second)
    pool.release(a + b + c)
    assert pool.num_parked_pages == 3 and pool.num_free_pages == 4
    second.done = True  # ends first (the pool does not assume an order)
    pool.reclaim()
    assert pool.num_parked_pages == 1 and pool.num_free_pages == 6  # b and c
    first.done = True
    pool.reclaim()
    assert pool.num_parked_pages == 0 and pool.num_free_pages == 7 and pool.ref_count(held[0]) == 1
    pool.release(held)  # no fence left on it
    assert pool.num_free_pages == 8


def test_a_reservation_short_of_pages_waits_for_parked_ones() -> None:
    """Pages parked behind the step in flight count as available: a request
    that needs them waits for that step rather than being retracted."""
    from pdserve.engine.radix_cache import RadixCache
    from pdserve.engine.request import Req
    from pdserve.engine.scheduler import Scheduler, SchedulerConfig

    pool = _pool(4)
    cfg = SchedulerConfig(page_size=4, max_running_requests=8, chunked_prefill_size=None, max_prefill_tokens=64,
                          schedule_policy="fcfs", schedule_conservativeness=1.0, context_len=64)
    scheduler = Scheduler(cfg, pool, RadixCache(pool, enabled=False))
    held = pool.alloc(4)
    guard = _Guard()
    pool.fence(held[:2], guard)
    pool.release(held)
    assert (pool.num_free_pages, pool.num_parked_pages, scheduler._available_pages()) == (2, 2, 4)
    req = Req("r", [1] * 12, SamplingParams())
    assert scheduler.reserve(req, 16) and guard.waited and len(req.pages) == 4


def test_feed_tokens_takes_device_rows_and_keeps_host_rows() -> None:
    tokens = torch.tensor([11, 22, 33])
    ids = torch.tensor([0, 0, 0], dtype=torch.int32)
    src = np.arange(3)
    feed_tokens(ids, torch.from_numpy(src), src, tokens)
    assert ids.tolist() == [11, 22, 33] and ids.dtype == torch.int32
    ids = torch.tensor([0, 7, 0, 9])
    src = np.array([2, -1, 0, -1])
    feed_tokens(ids, torch.from_numpy(src), src, tokens)
    assert ids.tolist() == [33, 7, 11, 9]


# ---- the engine with the overlap schedule on a CPU ------------------------------------
def _engine(model_dir: str, lookahead: bool | None, **overrides) -> Engine:
    """An engine (on the CPU unless told); ``lookahead`` None keeps the device's default."""
    cfg = ServerConfig(model_path=model_dir, **{"device": "cpu", **overrides}).resolve()
    ours, theirs = mp.Pipe()
    engine = Engine(cfg, model_dir, ours)
    engine._test_pipe_end = theirs  # keeps the pipe open for _receive
    if lookahead is not None:
        engine.runner.lookahead = lookahead
    return engine


class _Counts:
    """How often the runner launched and handed over ahead steps."""

    def __init__(self, engine: Engine) -> None:
        self.launched = self.taken = self.partial = 0
        runner = engine.runner
        launch, take = runner.launch_ahead, runner.take_ahead

        def counted_launch(*args):
            self.launched += 1
            return launch(*args)

        def counted_take(batch):
            out = take(batch)
            if out is not None:
                self.taken += 1
                self.partial += len(out[0]) < len(batch.reqs)
            return out

        runner.launch_ahead, runner.take_ahead = counted_launch, counted_take


def _drive(engine: Engine, arrivals: dict[int, list[GenerateRequest]], aborts: dict[int, str] | None = None):
    """Run the engine loop; ``arrivals[i]`` are admitted before turn ``i``.
    Returns {rid: (token ids, finish reason, logprobs)}."""
    tokens, reasons, logprobs = defaultdict(list), {}, defaultdict(list)
    front = engine._test_pipe_end
    for i in range(2000):
        for msg in arrivals.get(i, []):
            engine._admit(msg)
        if aborts and i in aborts:
            engine.abort(aborts[i])
        engine.run_once()
        while front.poll():
            batch = codec.decode(front.recv_bytes())
            for out in batch.outputs:  # a request's full output precedes its plain tokens
                tokens[out.rid] += out.token_ids
                logprobs[out.rid] += out.logprobs or []
                if out.finish_reason:
                    reasons[out.rid] = out.finish_reason
            for rid, ids in zip(batch.rids, batch.token_ids):
                tokens[rid] += ids
        if i > max(arrivals) and not engine.scheduler.num_live:
            break
    assert engine._receive()  # idle: the engine lets the last ahead step's pages go
    return {rid: (tokens[rid], reasons.get(rid), logprobs[rid]) for rid in tokens}


def _requests(prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerateRequest]:
    return [GenerateRequest(rid=f"r{i}", input_ids=p, params=sp) for i, (p, sp) in enumerate(zip(prompts, params))]


def _prompts(n: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 900, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def _assert_pool_empty(engine: Engine) -> None:
    pool = engine.pool
    assert pool.num_parked_pages == 0
    assert pool.num_free_pages + engine.cache.num_cached_pages == pool.num_pages


def test_outputs_match_the_serial_schedule(model_dir: str) -> None:
    prompts = _prompts(8)
    greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    serial = _engine(model_dir, lookahead=False)
    probe = _drive(serial, {0: _requests(prompts[:1], [greedy])})
    stop_at = probe["r0"][0][4]  # a token r0 produces: it must stop there under both schedules
    params = [
        SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop_at,)),
        SamplingParams(temperature=0, max_new_tokens=1),
        SamplingParams(temperature=0, max_new_tokens=2),
        SamplingParams(temperature=0, max_new_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0, max_new_tokens=9, logprobs=True, top_logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=5, max_new_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0, max_new_tokens=6, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0, max_new_tokens=11, ignore_eos=True),
    ]
    reqs = _requests(prompts, params)
    # Some arrive while others decode: they join batches that were launched ahead without them.
    arrivals = {0: reqs[:3], 4: reqs[3:6], 9: reqs[6:]}
    expected = _drive(_engine(model_dir, lookahead=False), arrivals)
    overlapped = _engine(model_dir, lookahead=True)
    counts = _Counts(overlapped)
    got = _drive(overlapped, arrivals)
    assert {rid: (t, r) for rid, (t, r, _) in got.items()} == {rid: (t, r) for rid, (t, r, _) in expected.items()}
    assert got["r0"][0][-1] == stop_at and got["r0"][1] == "stop"
    assert len(got["r3"][0]) == 17 and got["r3"][1] == "length"
    assert got["r4"][2] == pytest.approx(expected["r4"][2], abs=1e-5)
    assert counts.launched >= 15 and counts.taken >= 12
    assert counts.partial >= 1  # a request that joined waited one step instead of wasting the ahead step
    _assert_pool_empty(overlapped)


def test_an_abort_under_an_ahead_step_leaks_nothing(model_dir: str) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    engine = _engine(model_dir, lookahead=True)
    reqs = _requests(_prompts(3, seed=9), [params] * 3)
    got = _drive(engine, {0: reqs}, aborts={6: "r1"})
    assert got["r1"][1] == "abort" and len(got["r1"][0]) < 30
    assert len(got["r0"][0]) == 30 and len(got["r2"][0]) == 30
    _assert_pool_empty(engine)


def test_a_pool_too_small_for_everyone_still_finishes_everyone(model_dir: str) -> None:
    """Retraction while steps run ahead: every request completes, nothing leaks."""
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    engine = _engine(model_dir, lookahead=True, max_total_tokens=256, page_size=4)
    reqs = _requests(_prompts(8, seed=11), [params] * 8)
    got = _drive(engine, {0: reqs})
    assert all(len(got[f"r{i}"][0]) == 40 and got[f"r{i}"][1] == "length" for i in range(8))
    assert engine.scheduler.num_retracted_total > 0
    _assert_pool_empty(engine)


def _checked_fast_path(engine: Engine) -> dict[str, int]:
    """Put a CPU engine's runner on the GPU's host path (numpy step inputs,
    page lists mirrored across steps, fences from the step's page index) and
    check each step against the page lists; counts what was checked."""
    from pdserve.model.kernels.step_inputs import build_step

    runner, pool = engine.runner, engine.pool
    runner._fast = True
    seen = {"steps": 0, "fences": 0}
    step_inputs, fence = runner._step_inputs, pool.fence

    def checked_step_inputs(batch):
        step = step_inputs(batch)
        plain = build_step(batch.is_decode, batch.chunks, batch.starts, [r.pages for r in batch.reqs], pool.page_size)
        assert np.array_equal(step.kv_indices, plain.kv_indices) and np.array_equal(step.out_slots, plain.out_slots)
        seen["steps"] += 1
        return step

    def checked_fence(pages, guard):
        ahead_batch = runner._last_ahead_batch
        assert list(pages) == [r.pages[s // pool.page_size] for r, s in zip(*ahead_batch)]
        seen["fences"] += 1
        return fence(pages, guard)

    launch = runner.launch_ahead

    def recorded_launch(reqs, chunks, starts, *rest):
        runner._last_ahead_batch = (list(reqs), list(starts))
        return launch(reqs, chunks, starts, *rest)

    runner._step_inputs, pool.fence, runner.launch_ahead = checked_step_inputs, checked_fence, recorded_launch
    return seen


def _fast_path_matches_serial(model_dir: str, arrivals: dict, aborts: dict | None = None, **flags) -> Engine:
    expected = _drive(_engine(model_dir, lookahead=False, **flags), arrivals, aborts)
    engine = _engine(model_dir, lookahead=True, **flags)
    seen = _checked_fast_path(engine)
    got = _drive(engine, arrivals, aborts)
    assert {rid: (t, r) for rid, (t, r, _) in got.items()} == {rid: (t, r) for rid, (t, r, _) in expected.items()}
    assert seen["steps"] > 30 and seen["fences"] > 20
    _assert_pool_empty(engine)
    return engine


def test_the_gpu_host_path_gives_the_serial_schedules_outputs(model_dir: str) -> None:
    """On a CPU, with the torch backend: the same tokens as the serial
    schedule, with requests joining and one aborted."""
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (30, 5, 17, 40, 9, 23)]
    reqs = _requests(_prompts(6, seed=13), params)
    _fast_path_matches_serial(model_dir, {0: reqs[:3], 3: reqs[3:5], 8: reqs[5:]}, {12: "r2"}, page_size=4)


def test_the_gpu_host_path_under_retraction_gives_the_serial_schedules_outputs(model_dir: str) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    reqs = _requests(_prompts(8, seed=11), [params] * 8)
    engine = _fast_path_matches_serial(model_dir, {0: reqs}, max_total_tokens=256, page_size=4)
    assert engine.scheduler.num_retracted_total > 0


def test_an_ahead_step_is_not_handed_to_a_request_at_another_position(model_dir: str) -> None:
    from pdserve.model.batch import ScheduledBatch

    engine = _engine(model_dir, lookahead=True)
    runner = engine.runner
    (req,) = [r for r in _requests(_prompts(1), [SamplingParams(temperature=0)])]
    from pdserve.engine.request import Req

    r = Req(req.rid, req.input_ids, req.params)
    r.pages = runner.pool.alloc(4)
    r.num_computed = len(r.prompt_ids)
    r.output_ids.append(7)
    runner.launch_ahead([r], [[0]], [r.seq_len], np.array([0]), torch.tensor([9]))
    assert runner.take_ahead(ScheduledBatch(True, [r], [[7]], [r.seq_len - 2])) is None
    assert runner.take_ahead(ScheduledBatch(True, [r], [[7]], [r.seq_len])) is None  # used up by the first ask


# ---- on the GPU, where the ahead step really runs while the host waits -----------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_outputs_match_the_serial_schedule(tmp_path) -> None:
    from pdserve.tests.support.small_models import small_llama_dir

    model_dir = small_llama_dir(tmp_path)
    flags = dict(device="cuda", load_format="dummy", dtype="bfloat16", max_total_tokens=8192, cuda_graph_bs=(1, 2, 4, 8),
                 disable_radix_cache=True)  # prefills must not differ between the runs: no prefix hits
    serial = _engine(model_dir, None, disable_overlap_schedule=True, **flags)
    overlapped = _engine(model_dir, None, **flags)
    assert not serial.runner.lookahead and overlapped.runner.lookahead and overlapped.runner.graphs is not None
    prompts = _prompts(6, seed=21)
    probe = _drive(serial, {0: _requests(prompts[:1], [SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)])})
    stop_at = probe["r0"][0][5]
    # Everyone arrives at once, so both schedules run the same batches (a request
    # joining later would wait one step under the overlap schedule and change
    # the batch shapes, hence the bf16 rounding).
    params = [SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(stop_at,))] + [
        SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (1, 3, 20, 33, 12)]
    expected = _drive(serial, {0: _requests(prompts, params)})
    counts = _Counts(overlapped)
    got = _drive(overlapped, {0: _requests(prompts, params)})
    assert {rid: (t, r) for rid, (t, r, _) in got.items()} == {rid: (t, r) for rid, (t, r, _) in expected.items()}
    assert got["r0"][1] == "stop" and len(got["r4"][0]) == 33
    assert counts.taken >= 25
    _assert_pool_empty(overlapped)
    # Late arrivals join ahead steps one step late; they still finish whole.
    late = _requests(_prompts(4, seed=22), [SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)] * 4)
    got = _drive(overlapped, {0: late[:2], 5: late[2:]})
    assert all(len(got[r.rid][0]) == 16 for r in late) and counts.partial >= 1
    _assert_pool_empty(overlapped)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_the_gpu_does_not_wait_for_queued_work() -> None:
    """The overlap schedule samples step N before it launches step N+1: every
    sampling option must queue its work, not wait for the GPU to drain."""
    import time

    from pdserve.engine.sampler import Sampler

    sampler = Sampler(0, torch.device("cuda"))
    logits = torch.randn(4, 128256, device="cuda")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.9, top_k=50),
              SamplingParams(temperature=0.7, min_p=0.05, seed=3),
              SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.1)]
    histories = [([1, 2, 3], [4, 5])] * 4
    sampler.sample(logits, params, histories)  # warm up kernels and allocators
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time queued ahead of the sampling
    start = time.perf_counter()
    pending = sampler.sample_async(logits, params, histories)
    queued_s = time.perf_counter() - start
    result = pending.wait()
    waited_s = time.perf_counter() - start
    assert queued_s < 0.1 < waited_s, (queued_s, waited_s)
    assert len(result.token_ids) == 4
