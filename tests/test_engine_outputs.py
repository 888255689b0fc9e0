"""What the engine tells its front, and when: one batch per loop turn, plus
whatever the role produced before the step (a PD room's first token), sent
before the step runs rather than one step later."""

from __future__ import annotations

import multiprocessing as mp

from pdserve.common import codec
from pdserve.common.config import ServerConfig
from pdserve.common.messages import GenerateRequest, TokenBatch
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.engine import Engine
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
