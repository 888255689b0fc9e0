"""A decode instance's lease on a prefill instance whose control connection broke:
the bootstrap service's view (heartbeats, epoch) says when it is dead."""

from __future__ import annotations

import dataclasses
import threading
import time

from pdserve.decode.role import PrefillPeer, watch_lost_peer
from pdserve.tests.support.fake_worker import make_info


class _Control:
    closed = True


def _peer() -> PrefillPeer:
    return PrefillPeer(make_info("p1", epoch="a" * 16), "p1-agent", _Control())  # type: ignore[arg-type]


def _watch(peer: PrefillPeer, answers: list, until_s: float = 5.0) -> list[str]:
    asked: list[str] = []

    def lookup(instance_id: str):
        asked.append(instance_id)
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    watch_lost_peer(peer, lookup, 0.01, time.monotonic() + until_s, threading.Event())
    return asked


def test_a_peer_whose_entry_expired_is_dead() -> None:
    peer = _peer()
    asked = _watch(peer, [peer.info, peer.info, None])
    assert peer.dead and asked == ["p1"] * 3


def test_a_peer_registered_with_another_epoch_is_dead() -> None:
    peer = _peer()
    _watch(peer, [dataclasses.replace(peer.info, epoch="b" * 16)])
    assert peer.dead


def test_a_live_entry_or_an_unreachable_bootstrap_proves_nothing() -> None:
    peer = _peer()
    started = time.monotonic()
    _watch(peer, [peer.info, OSError("bootstrap down"), peer.info], until_s=0.3)
    assert not peer.dead
    assert time.monotonic() - started < 3.0  # gives up at its deadline


def test_the_watch_ends_when_the_instance_stops() -> None:
    peer = _peer()
    stop = threading.Event()
    stop.set()
    watch_lost_peer(peer, lambda _: peer.info, 10.0, time.monotonic() + 60, stop)
    assert not peer.dead
