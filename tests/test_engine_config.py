"""Engine settings resolved from the server config."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from pdserve.common.config import ServerConfig
from pdserve.engine.engine import PD_POLL_WAIT_S, Engine


@pytest.mark.parametrize("interval_ms, wait_s", [(None, PD_POLL_WAIT_S["cpu"]), (0.25, 0.25e-3)])
def test_rooms_in_flight_are_checked_at_the_poll_interval(model_dir: str, interval_ms, wait_s) -> None:
    cfg = ServerConfig(model_path=model_dir, device="cpu", disaggregation_poll_interval_ms=interval_ms).resolve()
    ours, _ = mp.Pipe()
    engine = Engine(cfg, model_dir, ours)
    assert engine.pd_poll_wait_s == pytest.approx(wait_s)


@pytest.mark.parametrize("interval_ms", [0.0, -1.0])
def test_a_poll_interval_must_be_positive(interval_ms: float) -> None:
    with pytest.raises(ValueError, match="poll-interval-ms must be positive"):
        ServerConfig(disaggregation_poll_interval_ms=interval_ms).validate()
