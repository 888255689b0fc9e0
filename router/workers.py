"""The router's view of its workers: who exists, who is healthy, how loaded.

Workers come from the command line (static, never removed) and, with a
bootstrap URL, from the bootstrap service's instance list (added and removed as
instances come and go). A periodic check asks each worker for ``/health`` and
``/get_server_info``: the latter gives the ``instance_id`` the prefill side is
addressed by, and the running/queued request counts that load-aware policies
add to the router's own in-flight count.

A worker is marked down only after ``health_failure_threshold`` consecutive
failures (checks or requests), and back up after ``health_success_threshold``
consecutive successful checks; a worker never seen healthy is up on its first
success. One failure is not an outage: a connection the worker closed while
it sat in the pool (a keep-alive race) is retried at once and not counted. A
port that refuses connections marks the worker down at once: nothing listens.
A check that times out on a worker that finished one of the router's requests
within the last interval plus timeout is not counted either: that worker is
alive and busy (a front whose event loop is saturated answers ``/health`` late),
and taking it out of rotation would move its load onto the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pdserve.bootstrap.protocol import InstanceInfo, InvalidInstanceInfo
from pdserve.common.roles import Role
from pdserve.router.config import RouterConfig
from pdserve.web.auth import bearer_headers

logger = logging.getLogger("pdserve.router.workers")

PREFILL, DECODE, COLOCATED = Role.PREFILL, Role.DECODE, Role.COLOCATED


@dataclass(eq=False)
class Worker:
    """Mutable state of one worker; identity is the object itself."""

    url: str
    role: Role  # the disaggregation_mode the instance must report
    discovered: bool = False
    instance_id: str | None = None
    healthy: bool = False
    num_running_reqs: int = 0
    num_queued_reqs: int = 0
    in_flight: int = 0  # requests this router has open on it right now
    last_error: str | None = None
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    was_down: bool = False  # marked down after being healthy: needs the success threshold
    last_answer_s: float | None = None  # time.monotonic() when it last finished a request of ours

    @property
    def load(self) -> int:
        return self.num_running_reqs + self.num_queued_reqs + self.in_flight

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role.value, "url": self.url, "instance_id": self.instance_id,
            "healthy": self.healthy, "load": self.load, "in_flight": self.in_flight,
            "num_running_reqs": self.num_running_reqs, "num_queued_reqs": self.num_queued_reqs,
            "source": "bootstrap" if self.discovered else "static", "last_error": self.last_error,
            "consecutive_failures": self.consecutive_failures,
        }


def _static_workers(config: RouterConfig) -> list[Worker]:
    pairs = ([(u, PREFILL) for u in config.prefill_urls] + [(u, DECODE) for u in config.decode_urls]
             + [(u, COLOCATED) for u in config.worker_urls])
    return [Worker(url=url.rstrip("/"), role=role) for url, role in pairs]


class WorkerRegistry:
    def __init__(
        self,
        config: RouterConfig,
        http: httpx.AsyncClient,
        on_removed: Callable[[Worker], None] | None = None,
    ) -> None:
        self._config = config
        self._http = http
        self._on_removed = on_removed
        self._roles = (PREFILL, DECODE) if config.mode == "pd" else (COLOCATED,)
        self._workers: dict[tuple[str, str], Worker] = {
            (w.role, w.url): w for w in _static_workers(config)}

    @property
    def roles(self) -> tuple[str, ...]:
        return self._roles

    def all(self) -> list[Worker]:
        return sorted(self._workers.values(), key=lambda w: (w.role, w.url))

    def healthy(self, role: str) -> list[Worker]:
        return [w for w in self.all() if w.role == role and w.healthy]

    def ready(self) -> bool:
        """At least one healthy worker of every role this router needs."""
        return all(self.healthy(role) for role in self._roles)

    def mark_failed(self, worker: Worker, reason: str, at_once: bool = False) -> None:
        """Count a failure; the worker leaves rotation once ``health_failure_threshold``
        failures in a row were counted (or at once when ``at_once``)."""
        worker.last_error = reason
        worker.consecutive_successes = 0
        worker.consecutive_failures += 1
        if not at_once and worker.consecutive_failures < self._config.health_failure_threshold:
            if worker.healthy:
                logger.info("worker %s %s failed (%d of %d before it is marked down): %s", worker.role,
                            worker.url, worker.consecutive_failures, self._config.health_failure_threshold, reason)
            return
        if worker.healthy:
            logger.warning("worker %s %s marked unhealthy: %s", worker.role, worker.url, reason)
            worker.was_down = True
        worker.healthy = False

    def answered_recently(self, worker: Worker) -> bool:
        """Whether the worker finished one of our requests since about the last check began."""
        window_s = self._config.health_check_interval_s + self._config.health_check_timeout_s
        return worker.last_answer_s is not None and time.monotonic() - worker.last_answer_s < window_s

    def mark_succeeded(self, worker: Worker) -> None:
        worker.consecutive_failures = 0
        worker.consecutive_successes += 1
        if worker.healthy:
            worker.last_error = None
            return
        if worker.was_down and worker.consecutive_successes < self._config.health_success_threshold:
            return
        logger.info("worker %s %s is healthy (%s)", worker.role, worker.url, worker.instance_id)
        worker.healthy, worker.last_error, worker.was_down = True, None, False

    async def refresh(self) -> None:
        if self._config.bootstrap_url:
            await self._discover(self._config.bootstrap_url)
        await asyncio.gather(*(self._check(w) for w in self.all()))

    async def run(self) -> None:
        """Refresh forever; the caller cancels the task on shutdown."""
        while True:
            interval_s = self._config.health_check_interval_s
            # While a role has no healthy worker, look again soon: startup, failover.
            await asyncio.sleep(interval_s if self.ready() else min(interval_s, 0.5))
            try:
                await self.refresh()
            except Exception:  # a bad round must not end the loop
                logger.exception("worker refresh failed")

    async def _discover(self, bootstrap_url: str) -> None:
        try:
            request = self._http.build_request("GET", bootstrap_url.rstrip("/") + "/instances",
                                               timeout=self._config.health_check_timeout_s)
            # The bootstrap service wants the cluster secret; the worker key is not its business.
            request.headers.pop("authorization", None)
            request.headers.update(bearer_headers(self._config.cluster_secret))
            response = await self._http.send(request)
            response.raise_for_status()
            infos = [_parse_instance(item) for item in response.json()]
        except (httpx.HTTPError, ValueError, TypeError) as exc:
            logger.warning("cannot list instances at %s: %s", bootstrap_url, exc)
            return
        seen = set()
        for info in infos:
            role = Role(info.role) if info else None
            if role in self._roles:
                key = (role, info.http_url.rstrip("/"))
                seen.add(key)
                if key not in self._workers:
                    logger.info("discovered %s %s (%s)", role, key[1], info.instance_id)
                    self._workers[key] = Worker(url=key[1], role=role, discovered=True)
        for key in [k for k, w in self._workers.items() if w.discovered and k not in seen]:
            logger.info("instance %s %s left the bootstrap service", *key)
            worker = self._workers.pop(key)
            if self._on_removed:
                self._on_removed(worker)

    async def _get(self, url: str) -> httpx.Response:
        """GET, once more on a fresh connection when a pooled one was closed under us."""
        timeout = self._config.health_check_timeout_s
        try:
            return await self._http.get(url, timeout=timeout)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            return await self._http.get(url, timeout=timeout)  # a keep-alive race is not a failure

    async def _check(self, worker: Worker) -> None:
        try:
            health = await self._get(worker.url + "/health")
            if health.status_code != 200:
                self.mark_failed(worker, f"/health answered {health.status_code}")
                return
            response = await self._get(worker.url + "/get_server_info")
            if response.status_code != 200:
                # /health is open even on a keyed instance: a refused key shows here.
                self.mark_failed(worker, _server_info_problem(response.status_code))
                return
            info = response.json()
        except httpx.ConnectError as exc:
            self.mark_failed(worker, f"unreachable: {exc!r}", at_once=refused(exc))
            return
        except httpx.TimeoutException as exc:
            if self.answered_recently(worker):
                logger.info("worker %s %s is slow to answer its check but serves requests: not counted (%r)",
                            worker.role, worker.url, exc)
                return
            self.mark_failed(worker, f"unreachable: {exc!r}")
            return
        except (httpx.HTTPError, ValueError) as exc:
            self.mark_failed(worker, f"unreachable: {exc!r}")
            return
        problem = self._apply_server_info(worker, info)
        if problem:
            self.mark_failed(worker, problem)
            return
        self.mark_succeeded(worker)

    def _apply_server_info(self, worker: Worker, info: Any) -> str | None:
        if not isinstance(info, dict):
            return "/get_server_info is not a JSON object"
        mode = info.get("disaggregation_mode")
        if mode is not None and mode != worker.role.value:
            return f"instance serves disaggregation_mode={mode}, router expects {worker.role}"
        instance_id = info.get("instance_id")
        if worker.role == PREFILL and not instance_id:
            return "prefill instance reports no instance_id"
        worker.instance_id = str(instance_id) if instance_id else None
        worker.num_running_reqs = _count(info.get("num_running_reqs"))
        worker.num_queued_reqs = _count(info.get("num_queued_reqs"))
        return None


def _server_info_problem(status: int) -> str:
    if status in (401, 403):
        return f"/get_server_info answered {status}: the instance refused the router's key (--worker-api-key)"
    return f"/get_server_info answered {status}"
def refused(exc: BaseException) -> bool:
    """Whether a connect error was a refusal: nothing listens on the worker's port."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _parse_instance(item: Any) -> InstanceInfo | None:
    try:
        return InstanceInfo.from_json(item)
    except InvalidInstanceInfo as exc:
        logger.warning("ignoring malformed bootstrap entry: %s", exc)
        return None
