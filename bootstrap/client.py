"""Synchronous client of the bootstrap service, used inside instance processes.

It runs in plain threads (the heartbeat) and in engine code that is not async,
so it is a sync ``httpx.Client``. A heartbeat answered 404 means the service
forgot the instance (restart or TTL expiry): the heartbeat loop registers it
again, so a restarted bootstrap service is whole again within one interval.

One client is one registrant: it draws a token that binds the instance_ids it
registers to it (see ``registry.py``), and presents the cluster secret, if any.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

import httpx
from pdserve.bootstrap.protocol import ID_IN_USE, TOKEN_HEADER, InstanceInfo
from pdserve.common.startup import StartupError
from pdserve.web.auth import bearer_headers

logger = logging.getLogger("pdserve.bootstrap.client")


class BootstrapError(RuntimeError):
    """The bootstrap service answered with an unexpected error."""


class RegistrationRefused(BootstrapError, StartupError):
    """409: the instance cannot pair with a live one, or its id is live under another
    registrant; the message says why (one line)."""


class BootstrapUnreachable(BootstrapError, StartupError):
    """Nothing answers at the bootstrap service's URL."""


ID_RETRY_INTERVAL_S = 0.5


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text or f"HTTP {response.status_code}"


def _error_code(response: httpx.Response) -> object:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


class BootstrapClient:
    def __init__(self, url: str, timeout_s: float = 5.0, secret: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = secrets.token_hex(16)  # this registrant's: see registry.py
        headers = {**bearer_headers(secret), TOKEN_HEADER: self.token}
        # Cluster-internal traffic: ignore HTTP proxies set in the environment.
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, trust_env=False, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BootstrapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, info: InstanceInfo, id_wait_s: float = 0.0) -> None:
        """Raises :class:`RegistrationRefused` on a conflict and
        :class:`BootstrapUnreachable` when nothing answers at the URL.

        An id still held by another registrant (this instance's previous life,
        killed before it could deregister) is asked for again for ``id_wait_s``:
        the old entry expires one TTL after its last heartbeat.
        """
        deadline = time.monotonic() + id_wait_s
        while True:
            try:
                response = self._http.post("/register", json=info.to_json())
            except httpx.TransportError as exc:
                raise BootstrapUnreachable(
                    f"cannot reach the bootstrap service at {self.url} ({exc or type(exc).__name__}); "
                    "start it (pdserve bootstrap) or check --disaggregation-bootstrap-url") from None
            if response.status_code != 409:
                break
            if _error_code(response) != ID_IN_USE or time.monotonic() >= deadline:
                raise RegistrationRefused(_error_message(response))
            time.sleep(ID_RETRY_INTERVAL_S)
        self._check(response, "register")

    def heartbeat(self, instance_id: str) -> bool:
        """False when the service does not know the instance (register again);
        raises :class:`RegistrationRefused` when another registrant holds the id."""
        response = self._http.post("/heartbeat", json={"instance_id": instance_id})
        if response.status_code == 404:
            return False
        if response.status_code == 409:
            raise RegistrationRefused(_error_message(response))
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
