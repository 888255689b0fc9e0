"""Synchronous client of the bootstrap service, used inside instance processes.

It runs in plain threads (the heartbeat) and in engine code that is not async,
so it is a sync ``httpx.Client``. A heartbeat answered 404 means the service
forgot the instance (restart or TTL expiry): the heartbeat loop registers it
again, so a restarted bootstrap service is whole again within one interval.
"""

from __future__ import annotations

import logging
import threading

import httpx
from pdserve.bootstrap.protocol import InstanceInfo
from pdserve.common.startup import StartupError

logger = logging.getLogger("pdserve.bootstrap.client")


class BootstrapError(RuntimeError):
    """The bootstrap service answered with an unexpected error."""


class RegistrationRefused(BootstrapError, StartupError):
    """409: the instance cannot pair with a live one; the message says why (one line)."""


class BootstrapUnreachable(BootstrapError, StartupError):
    """Nothing answers at the bootstrap service's URL."""


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text or f"HTTP {response.status_code}"


class BootstrapClient:
    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        # Cluster-internal traffic: ignore HTTP proxies set in the environment.
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BootstrapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, info: InstanceInfo) -> None:
        """Raises :class:`RegistrationRefused` on a pairing conflict and
        :class:`BootstrapUnreachable` when nothing answers at the URL."""
        try:
            response = self._http.post("/register", json=info.to_json())
        except httpx.TransportError as exc:
            raise BootstrapUnreachable(
                f"cannot reach the bootstrap service at {self.url} ({exc or type(exc).__name__}); "
                "start it (pdserve bootstrap) or check --disaggregation-bootstrap-url") from None
        if response.status_code == 409:
            raise RegistrationRefused(_error_message(response))
        self._check(response, "register")

    def heartbeat(self, instance_id: str) -> bool:
        """False when the service does not know the instance (register again)."""
        response = self._http.post("/heartbeat", json={"instance_id": instance_id})
        if response.status_code == 404:
            return False
        self._check(response, "heartbeat")
        return True

    def heartbeat_forever(
        self, info: InstanceInfo, interval_s: float, stop_event: threading.Event
    ) -> None:
        """Thread target: heartbeat every ``interval_s`` until ``stop_event``.

        Never raises: a service that is down or refuses is logged and tried
        again at the next interval.
        """
        while not stop_event.wait(interval_s):
            try:
                if not self.heartbeat(info.instance_id):
                    logger.info("bootstrap forgot %s; registering again", info.instance_id)
                    self.register(info)
            except RegistrationRefused as exc:
                logger.error("bootstrap refused %s: %s", info.instance_id, exc)
            except (httpx.HTTPError, BootstrapError) as exc:
                logger.warning("bootstrap heartbeat failed: %s", exc)

    def lookup(self, instance_id: str) -> InstanceInfo | None:
        response = self._http.get(f"/instances/{instance_id}")
        if response.status_code == 404:
            return None
        self._check(response, "lookup")
        return InstanceInfo.from_json(response.json())

    def list(self, role: str | None = None) -> list[InstanceInfo]:
        params = {"role": role} if role else None
        response = self._http.get("/instances", params=params)
        self._check(response, "list")
        return [InstanceInfo.from_json(item) for item in response.json()]

    def deregister(self, instance_id: str) -> None:
        """Remove the instance; unknown instances are not an error."""
        response = self._http.delete(f"/instances/{instance_id}")
        if response.status_code != 404:
            self._check(response, "deregister")

    def _check(self, response: httpx.Response, what: str) -> None:
        if response.status_code >= 400:
            raise BootstrapError(
                f"bootstrap {what} failed ({response.status_code}): {_error_message(response)}")
