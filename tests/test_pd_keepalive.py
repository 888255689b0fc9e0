"""Which rooms a prefill instance keeps alive, and when (``RoomsInPrefill``).

The whole path runs in ``test_pd_backlog.py``; here one round of the prefill
role's bookkeeping, on rooms in every state it tells apart."""

from __future__ import annotations

import time

from pdserve.prefill.role import (
    KEEPALIVES_PER_TIMEOUT,
    MAX_BACKLOG_TIMEOUTS,
    PrefillRole,
    PrefillRoom,
)
from pdserve.transfer.pd_messages import RoomsInPrefill

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
