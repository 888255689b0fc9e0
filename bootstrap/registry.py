"""The bootstrap service's state: live instances, their TTL, and pairing rules.

An entry lives ``ttl_s`` after its last registration or heartbeat. Pairing is
checked when an instance registers, never at request time: a prefill and a
decode instance of the same model must agree on the PD protocol version, the
KV page layout and the transfer backend, so a mismatch is refused with both values named. Colocated
(``null``) instances never transfer KV and are not checked.

An instance_id belongs to the process that registered it: the registration
carries a token that process drew at random, and while the entry lives only
that token may register, heartbeat or delete it again. Once the entry expired
or was deleted, the id is free: a restarted instance takes it with a new token.
An entry registered without a token (a client that sends none) binds nothing.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.bootstrap.protocol import InstanceInfo


class PairingConflict(Exception):
    """Registration refused: the instance cannot pair with a live one."""


class IdentityConflict(Exception):
    """The instance_id is live and was registered by another process (another token)."""


@dataclass
class _Entry:
    info: InstanceInfo
    last_seen_s: float
    token: str | None = None


def _owner_problem(entry: _Entry, token: str | None, action: str) -> str | None:
    """Why a request with ``token`` may not ``action`` the live ``entry``, or None."""
    if entry.token is None or (token is not None and hmac.compare_digest(entry.token.encode(), token.encode())):
        return None
    return (f"cannot {action} instance '{entry.info.instance_id}': it is live and was registered by "
            "another process; a restarted instance registers again once the old entry expired")


class InstanceRegistry:
    """Thread-safe map of instance_id -> info with expiry."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def register(self, info: InstanceInfo, token: str | None = None) -> None:
        """Add or replace ``info``; raises :class:`PairingConflict` or :class:`IdentityConflict`."""
        with self._lock:
            now = self._expire()
            live = self._entries.get(info.instance_id)
            problem = live and _owner_problem(live, token, "register")
            if problem:
                raise IdentityConflict(problem)
            for entry in self._entries.values():
                if entry.info.instance_id != info.instance_id:
                    problem = pairing_problem(info, entry.info)
                    if problem:
                        raise PairingConflict(problem)
            self._entries[info.instance_id] = _Entry(info, now, token)

    def heartbeat(self, instance_id: str, token: str | None = None) -> bool:
        """Refresh the TTL; False when the instance is unknown or expired.

        Raises :class:`IdentityConflict` when another process owns the entry."""
        with self._lock:
            now = self._expire()
            entry = self._owned(instance_id, token, "heartbeat")
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

    def delete(self, instance_id: str, token: str | None = None) -> bool:
        """False when unknown; raises :class:`IdentityConflict` when another process owns it."""
        with self._lock:
            self._expire()
            if self._owned(instance_id, token, "delete") is None:
                return False
            del self._entries[instance_id]
            return True

    def _owned(self, instance_id: str, token: str | None, action: str) -> _Entry | None:
        """The live entry, or None; raises :class:`IdentityConflict` when it is another process's."""
        entry = self._entries.get(instance_id)
        if entry is not None:
            problem = _owner_problem(entry, token, action)
            if problem:
                raise IdentityConflict(problem)
        return entry

    def _expire(self) -> float:
        now = self._clock()
        dead = [k for k, e in self._entries.items() if now - e.last_seen_s > self._ttl_s]
        for key in dead:
            del self._entries[key]
        return now


def pairing_problem(new: InstanceInfo, live: InstanceInfo) -> str | None:
    """Why ``new`` may not join next to ``live``, or None when they can pair."""
    if new.model != live.model or not new.role.is_pd or not live.role.is_pd:
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
