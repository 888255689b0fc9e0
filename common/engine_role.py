"""What differs between colocated, prefill and decode instances, as engine hooks.

The engine loop is the same for every role; a role decides where a new request
goes, what happens after each step, and who releases a finished request's pages.
Roles register by ``--disaggregation-mode`` name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.common.engine import Engine
    from pdserve.common.request import Req
    from pdserve.common.scheduler import ScheduledBatch

_ROLES: dict[str, type[EngineRole]] = {}


def register_role(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        _ROLES[name] = cls
        return cls

    return wrap


def create_role(name: str, engine: Engine) -> EngineRole:
    if name not in _ROLES:
        # The PD roles live in their own packages (prefill/, decode/) and register on import.
        importlib.import_module(f"pdserve.{name}.role")
    return _ROLES[name](engine)


class EngineRole:
    # How long an idle engine blocks on its front pipe before polling the role again.
    idle_wait_s = 0.05

    def __init__(self, engine: Engine):
        self.engine = engine

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

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


@register_role("null")
class ColocatedRole(EngineRole):
    """Prefill and decode in one instance: the scheduler does everything."""
