"""Which rooms a prefill instance keeps alive, and when (``RoomsInPrefill``).

The whole path runs in ``test_pd_backlog.py``; here one round of the prefill
role's bookkeeping, on rooms in every state it tells apart."""

from __future__ import annotations

import time
from types import SimpleNamespace

from pdserve.prefill.role import (
    KEEPALIVES_PER_TIMEOUT,
    MAX_BACKLOG_TIMEOUTS,
    PrefillRole,
    PrefillRoom,
)
from pdserve.transfer.pd_messages import KVPagesRequest, RoomsInPrefill

TIMEOUT_S = 4.0


class _Sender:
    def __init__(self) -> None:
        self.kept = 0

    def keep_alive(self) -> None:
        self.kept += 1


def _role(rooms: dict[int, PrefillRoom]) -> tuple[PrefillRole, list[tuple[int, object]]]:
    role = PrefillRole.__new__(PrefillRole)  # the round needs none of the transfer machinery
    sent: list[tuple[int, object]] = []
    role.timeout_s, role.rooms, role.kept_alive_s = TIMEOUT_S, rooms, time.monotonic()
    role._send = lambda conn_id, msg: sent.append((conn_id, msg)) or True
    return role, sent


def test_a_round_names_the_rooms_still_prefilling_to_their_own_decode_side() -> None:
    now = time.monotonic()
    queued, prefilling, other_conn, posted, starved = (_Sender() for _ in range(5))
    rooms = {
        1: PrefillRoom(None, 10, queued, paired_s=now),
        2: PrefillRoom(None, 10, prefilling, paired_s=now - TIMEOUT_S, num_pages_sent=3),
        3: PrefillRoom(None, 11, other_conn, paired_s=now),
        4: PrefillRoom(None, 10, posted, paired_s=now, last_sent=True),  # only the transfer is left
        5: PrefillRoom(None, 10, starved, paired_s=now - (MAX_BACKLOG_TIMEOUTS + 1) * TIMEOUT_S),
    }
    role, sent = _role(rooms)
    role._keep_backlog_alive()
    assert sent == []  # not a quarter of the timeout yet
    role.kept_alive_s -= TIMEOUT_S / KEEPALIVES_PER_TIMEOUT
    role._keep_backlog_alive()
    assert sent == [(10, RoomsInPrefill(rooms=[1, 2])), (11, RoomsInPrefill(rooms=[3]))]
    assert [s.kept for s in (queued, prefilling, other_conn, posted, starved)] == [1, 1, 1, 0, 0]
    role._keep_backlog_alive()
    assert len(sent) == 2  # the next round waits its quarter again


def test_pairing_names_the_room_to_its_decode_side_at_once() -> None:
    """D's deadline ran from its page list, which may have waited here most of a
    timeout for P's copy of the request: pairing restarts it on D at once."""
    role, sent = _role({})
    req = SimpleNamespace(prompt_ids=list(range(20)), stages_s={})
    pages = KVPagesRequest(room=7, prefill_epoch="e", decode_instance_id="d", peer_info=b"",
                           dst_pages=[3, 4], num_prompt_tokens=20)
    arrived_s = time.monotonic() - 0.9 * TIMEOUT_S
    role.page_size, role.peer_conns = 16, {}
    role.waiting_reqs = {7: (req, arrived_s + TIMEOUT_S)}
    role.waiting_pages = {7: (12, pages, arrived_s + TIMEOUT_S)}
    role.endpoint = SimpleNamespace(add_peer=lambda info: "peer-d")
    role.agent = SimpleNamespace(create_sender=lambda room, peer, dst_pages, timeout_s: (room, peer, dst_pages))
    queued: list = []
    role.engine = SimpleNamespace(scheduler=SimpleNamespace(add=queued.append))
    role._try_pair(7)
    assert sent == [(12, RoomsInPrefill(rooms=[7]))]
    assert queued == [req] and role.rooms[7].sender == (7, "peer-d", [3, 4])
    assert req.stages_s["prefill_bootstrap"] >= 0.9 * TIMEOUT_S  # the page list's wait for the request
