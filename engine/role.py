"""What differs between colocated, prefill and decode instances, as engine hooks.

The engine loop is the same for every role; a role decides where a new request
goes, what happens after each step, and who releases a finished request's pages.
The engine is handed its role's class (``serve.py``'s ``ROLES`` picks it by
``--disaggregation-mode``): the engine never imports ``prefill/``, ``decode/``
or ``transfer/``.

``EngineHandle`` is everything a role may use of the engine that runs it.
"""

from __future__ import annotations

from typing import Protocol

from pdserve.common.config import ServerConfig
from pdserve.common.kv_layout import KVLayout
from pdserve.common.messages import RoleStats
from pdserve.engine.request import Req
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.tp import Followers
from pdserve.model.batch import ScheduledBatch
from pdserve.model.kv_pool import KVPool


class EngineHandle(Protocol):
    """The engine as its role sees it."""

    cfg: ServerConfig
    pool: KVPool
    scheduler: Scheduler
    followers: Followers | None  # ranks 1.. of a tensor-parallel instance (engine/tp.py)

    def check_finish(self, req: Req, token: int) -> None:
        """Mark ``req`` finished if ``token`` (just appended) ends it."""

    def emit(self, req: Req, error: str | None = None, error_status: int | None = None,
             error_code: str | None = None) -> None:
        """Queue ``req``'s new tokens (or its error) for the front."""

    def fail(self, req: Req, error: str, status: int = 500, code: str | None = None) -> None:
        """End ``req`` with an error the client sees (``code``: the error object's code)."""


class EngineRole:
    # How long an idle engine blocks on its front pipe before polling the role again.
    idle_wait_s = 0.05
    # The id registered at the bootstrap service (PD roles set it).
    instance_id: str | None = None

    def __init__(self, engine: EngineHandle):
        self.engine = engine

    @staticmethod
    def follower_transfer(cfg: ServerConfig, buffer: object, layout: KVLayout, rank: int) -> object | None:
        """A follower rank's part of this role's KV transfer (tensor parallelism,
        ``engine/tp.py``: rank 0 calls it by name); None for a role that moves no KV."""
        return None

    def admit(self, req: Req) -> None:
        """A new request arrived from the front."""
        self.engine.scheduler.add(req)

    def poll(self) -> None:
        """Called once per loop iteration: control messages, transfers, timeouts."""

    def has_pending(self) -> bool:
        """True while the role waits on something that needs frequent polling."""
        return False

    def after_step(self, batch: ScheduledBatch) -> None:
        """Called after every forward step with the batch it ran."""

    def on_finished(self, req: Req) -> bool:
        """A request finished; return True to take over releasing its pages."""
        return False

    def abort(self, rid: str) -> Req | None:
        """Drop a request held by the role outside the scheduler, if any."""
        return None

    def timing(self, req: Req, now_s: float) -> dict[str, float]:
        """Seconds ``req`` spent in each phase of this instance, once it finished."""
        return colocated_timing(req, now_s)

    def held_pages(self) -> set[int]:
        """Pages the role holds outside the scheduler (rooms in flight, draining, quarantined)."""
        return set()

    def stats(self) -> RoleStats | None:
        """What the role adds to the engine's stats (PD roles: ``PDEndpoint.stats``)."""
        return None

    def close(self) -> None:
        pass


def _span(start_s: float | None, end_s: float | None) -> float:
    return max(end_s - start_s, 0.0) if start_s is not None and end_s is not None else 0.0


def colocated_timing(req: Req, now_s: float) -> dict[str, float]:
    """Queue (arrival to first forward), prefill (to the first token), decode (to the end)."""
    scheduled = req.scheduled_s if req.scheduled_s is not None else now_s
    first = req.first_token_s if req.first_token_s is not None else now_s
    return {"prefill_queue": _span(req.arrival_s, scheduled), "prefill": _span(scheduled, first),
            "decode": _span(first, now_s)}


class ColocatedRole(EngineRole):
    """Prefill and decode in one instance: the scheduler does everything."""
