"""A decode instance's lease on a prefill instance whose control connection broke:
the bootstrap service's view (heartbeats, epoch) says when it is dead."""

from __future__ import annotations

import dataclasses
import threading
import time

from pdserve.decode.role import PrefillPeer, watch_lost_peer
from pdserve.tests.support.clock import FakeClock
from pdserve.tests.support.fake_worker import make_info

INTERVAL_S = 1.0


class _Control:
    closed = True


class _TickingStop(threading.Event):
    """A stop event nobody sets, on whose wait ``clock`` moves on instead of time passing."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self._clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        self._clock.advance(timeout or 0.0)
        return self.is_set()


def _peer() -> PrefillPeer:
    return PrefillPeer(make_info("p1", epoch="a" * 16), "p1-agent", _Control())  # type: ignore[arg-type]


def _watch(peer: PrefillPeer, answers: list, clock: FakeClock, until_s: float = 5.0) -> list[str]:
    """Watch ``peer`` with a lookup that gives ``answers`` in turn (the last one
    again and again) until ``until_s`` on ``clock``; the lookups it made."""
    asked: list[str] = []

    def lookup(instance_id: str):
        asked.append(instance_id)
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    watch_lost_peer(peer, lookup, INTERVAL_S, clock() + until_s, _TickingStop(clock), clock=clock)
    return asked


def test_a_peer_whose_entry_expired_is_dead() -> None:
    peer = _peer()
    asked = _watch(peer, [peer.info, peer.info, None], FakeClock())
    assert peer.dead and asked == ["p1"] * 3


def test_a_peer_registered_with_another_epoch_is_dead() -> None:
    peer = _peer()
    _watch(peer, [dataclasses.replace(peer.info, epoch="b" * 16)], FakeClock())
    assert peer.dead


def test_a_live_entry_or_an_unreachable_bootstrap_proves_nothing() -> None:
    peer, clock = _peer(), FakeClock()
    deadline_s = clock() + 3 * INTERVAL_S
    asked = _watch(peer, [peer.info, OSError("bootstrap down"), peer.info], clock, until_s=3 * INTERVAL_S)
    assert not peer.dead
    assert asked == ["p1"] * 3 and clock() == deadline_s  # asked at every interval, gave up at its deadline


def test_the_watch_ends_when_the_instance_stops() -> None:
    peer = _peer()
    stop = threading.Event()
    stop.set()
    watch_lost_peer(peer, lambda _: peer.info, 10.0, time.monotonic() + 60, stop)
    assert not peer.dead
