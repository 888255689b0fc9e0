"""The bootstrap service's state: live instances, their TTL, and pairing rules.

An entry lives ``ttl_s`` after its last registration or heartbeat. Pairing is
checked when an instance registers, never at request time: a prefill and a
decode instance of the same model must agree on the PD protocol version, the
KV page layout and the transfer backend, so a mismatch is refused with both values named. Colocated
(``null``) instances never transfer KV and are not checked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.bootstrap.protocol import InstanceInfo
from pdserve.common.roles import Role


class PairingConflict(Exception):
    """Registration refused: the instance cannot pair with a live one."""


@dataclass
class _Entry:
    info: InstanceInfo
    last_seen_s: float


class InstanceRegistry:
    """Thread-safe map of instance_id -> info with expiry."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def register(self, info: InstanceInfo) -> None:
        """Add or replace ``info``; raises :class:`PairingConflict`."""
        with self._lock:
            now = self._expire()
            for entry in self._entries.values():
                if entry.info.instance_id != info.instance_id:
                    problem = pairing_problem(info, entry.info)
                    if problem:
                        raise PairingConflict(problem)
            self._entries[info.instance_id] = _Entry(info, now)

    def heartbeat(self, instance_id: str) -> bool:
        """Refresh the TTL; False when the instance is unknown or expired."""
        with self._lock:
            now = self._expire()
            entry = self._entries.get(instance_id)
            if entry is None:
                return False
            entry.last_seen_s = now
            return True

    def get(self, instance_id: str) -> InstanceInfo | None:
        with self._lock:
            self._expire()
            entry = self._entries.get(instance_id)
            return entry.info if entry else None

    def list(self, role: str | None = None) -> list[InstanceInfo]:
        with self._lock:
            self._expire()
            infos = [e.info for e in self._entries.values()]
        return [i for i in infos if role is None or i.role == role]

    def delete(self, instance_id: str) -> bool:
        with self._lock:
            return self._entries.pop(instance_id, None) is not None

    def _expire(self) -> float:
        now = self._clock()
        dead = [k for k, e in self._entries.items() if now - e.last_seen_s > self._ttl_s]
        for key in dead:
            del self._entries[key]
        return now


def pairing_problem(new: InstanceInfo, live: InstanceInfo) -> str | None:
    """Why ``new`` may not join next to ``live``, or None when they can pair."""
    if new.model != live.model or not Role(new.role).is_pd or not Role(live.role).is_pd:
        return None
    new_name = f"{new.role} '{new.instance_id}'"
    live_name = f"{live.role} '{live.instance_id}'"
    context = f"cannot register {new_name} of model '{new.model}' next to live {live_name}"
    if new.pd_protocol_version != live.pd_protocol_version:
        return (f"{context}: pd_protocol_version mismatch ({new_name}={new.pd_protocol_version} "
                f"vs {live_name}={live.pd_protocol_version}); run one pdserve version on both sides")
    if new.transfer_backend != live.transfer_backend:
        return (f"{context}: transfer_backend mismatch ({new_name}={new.transfer_backend} "
                f"vs {live_name}={live.transfer_backend})")
    mismatch = new.kv_layout.mismatch(live.kv_layout, self_name=new_name, other_name=live_name)
    if mismatch:
        return f"{context}: {mismatch}"
    return None
