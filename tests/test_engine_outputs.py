"""What the engine tells its front, and when: one batch per loop turn, plus
whatever the role produced before the step (a PD room's first token), sent
before the step runs rather than one step later."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp

import pytest
from pdserve.common import codec
from pdserve.common.config import ServerConfig
from pdserve.common.messages import GenerateRequest, TokenBatch
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.engine import Engine
from pdserve.engine.request import Req
from pdserve.engine.role import EngineRole


class _FailOnce(EngineRole):
    """Fails request ``rid`` from its poll once the request is decoding."""

    def __init__(self, engine: Engine, rid: str) -> None:
        super().__init__(engine)
        self.rid, self.done = rid, False

    def poll(self) -> None:
        req = next((r for r in self.engine.scheduler.running if r.rid == self.rid), None)
        if req is not None and not self.done:
            self.done = True
            self.engine.scheduler.remove(req.rid)
            self.engine.scheduler.release(req, cache=False)
            self.engine.fail(req, "peer lost", 502)


def _batches(front) -> list[TokenBatch]:
    got = []
    while front.poll():
        got.append(codec.decode(front.recv_bytes()))
    return got


def test_role_outputs_leave_before_the_step_and_plain_tokens_travel_as_columns(model_dir: str) -> None:
    cfg = ServerConfig(model_path=model_dir, device="cpu").resolve()
    ours, front = mp.Pipe()
    engine = Engine(cfg, model_dir, ours)
    engine.role = _FailOnce(engine, "a")
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    for rid in ("a", "b"):
        engine._admit(GenerateRequest(rid=rid, input_ids=[5, 6, 7], params=params))
    engine.run_once()  # prefill: first outputs carry the prompt counts
    first = _batches(front)
    assert [o.rid for b in first for o in b.outputs] == ["a", "b"]
    assert all(o.prompt_tokens == 3 for b in first for o in b.outputs)
    engine.run_once()  # the role fails "a" before the decode step of "b"
    turn = _batches(front)
    assert len(turn) == 2, "the role's output must not wait for the step"
    failed, step = turn
    assert [(o.rid, o.error, o.error_status) for o in failed.outputs] == [("a", "peer lost", 502)]
    assert not failed.rids
    assert step.outputs == [] and step.rids == ["b"] and len(step.token_ids[0]) == 1
    for _ in range(8):
        engine.run_once()
    rest = _batches(front)
    plain = [ids for b in rest for ids in b.token_ids]
    (last,) = [o for b in rest for o in b.outputs]
    assert last.rid == "b" and last.finish_reason == "length"
    assert 1 + 1 + len(plain) + len(last.token_ids) == 6


# ---- the per-step loops against the rules they inline ------------------------------------
def _engine(model_dir: str, **overrides) -> tuple[Engine, object]:
    cfg = ServerConfig(model_path=model_dir, device="cpu", **overrides).resolve()
    ours, front = mp.Pipe()
    return Engine(cfg, model_dir, ours), front


def _decoding(rid: str, prompt_len: int, outputs: list[int], **params) -> Req:
    req = Req(rid, list(range(5, 5 + prompt_len)), SamplingParams(temperature=0.0, **params))
    req.output_ids = list(outputs)
    return req


def test_recording_a_step_ends_requests_as_check_finish_does(model_dir: str) -> None:
    """``_record`` inlines ``check_finish``: the same finishes for EOS (and
    ignore_eos), stop tokens, max_new_tokens and the context length."""
    from pdserve.engine.sampler import SampleResult

    engine, _ = _engine(model_dir, context_length=40)
    eos = next(iter(engine.eos_ids))
    cases = [  # (prompt length, outputs so far, params, token)
        (4, [9], {}, eos), (4, [9], {"ignore_eos": True}, eos), (4, [9], {"stop_token_ids": (77, 78)}, 78),
        (4, [9, 9], {"max_new_tokens": 3}, 12), (4, [9], {"max_new_tokens": 3}, 12),
        (38, [9], {}, 12), (37, [9], {}, 12), (4, [], {}, 12), (4, [], {"stop_token_ids": (12,)}, 12),
    ]
    recorded = [_decoding(f"r{i}", n, out, **p) for i, (n, out, p, _) in enumerate(cases)]
    engine._record(recorded, SampleResult(token_ids=[token for *_, token in cases]))
    for req, (n, out, params, token) in zip(recorded, cases):
        expected = _decoding("x", n, out + [token], **params)
        engine.check_finish(expected, token)
        assert (req.finish_reason, req.matched_stop, req.output_ids) == (
            expected.finish_reason, expected.matched_stop, expected.output_ids), (n, out, params, token)
        assert req.first_token_s is not None and req.last_token_s is not None


@pytest.mark.parametrize("stream_interval", [1, 3])
def test_streaming_the_running_requests_sends_what_emit_sends(model_dir: str, stream_interval: int) -> None:
    """``_emit_running`` inlines ``emit``'s common case: the same outputs, and
    the same columns, for every state a running request can be in."""
    engine, _ = _engine(model_dir, stream_interval=stream_interval)
    states = [  # (outputs, already sent, logprobs)
        ([1], 0, False), ([1, 2], 1, False), ([1, 2, 3, 4], 1, False), ([1, 2, 3], 3, False),
        ([1, 2, 3, 4, 5], 2, False), ([1, 2], 1, True), ([1, 2, 3, 4], 0, True), ([], 0, False),
    ]

    def running() -> list:
        reqs = []
        for i, (out, sent, lp) in enumerate(states):
            req = _decoding(f"r{i}", 3, out, logprobs=lp)
            req.logprobs = [-0.5] * len(out) if lp else []
            req.top_logprobs = [[]] * len(out) if lp else []
            req.num_sent = sent
            reqs.append(req)
        return reqs

    engine.scheduler.running = running()
    engine._emit_running()
    fast, fast_sent = engine.batch, [r.num_sent for r in engine.scheduler.running]
    engine.batch = TokenBatch()
    engine.scheduler.running = running()
    for req in engine.scheduler.running:
        engine.emit(req)
    assert (fast.rids, fast.token_ids) == (engine.batch.rids, engine.batch.token_ids)
    strip = lambda outs: [dataclasses.replace(o, timing=None) for o in outs]  # noqa: E731
    assert strip(fast.outputs) == strip(engine.batch.outputs)
    assert fast_sent == [r.num_sent for r in engine.scheduler.running]
