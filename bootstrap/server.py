"""``pdserve bootstrap``: the registry every instance registers with.

Endpoints (all errors are OpenAI-style error objects):

- ``POST /register`` an :class:`InstanceInfo` JSON; 409 when it cannot pair
- ``POST /heartbeat`` ``{"instance_id"}``; 404 when unknown, so it re-registers
- ``GET /instances[?role=prefill]``, ``GET /instances/{id}``, ``DELETE /instances/{id}``
- ``GET /health``, ``GET /get_server_info`` (the configuration and the live instance counts)

With a cluster secret (``--cluster-secret``, ``--cluster-secret-file`` or
``$PDSERVE_CLUSTER_SECRET``) every endpoint but ``/health`` wants
``Authorization: Bearer SECRET`` (401 otherwise): lookups too, since an entry
names where prompts go and the peers' transfer metadata. Registration,
heartbeat and deletion carry the registrant's token in the
``X-PDServe-Registration-Token`` header; a live instance_id answers 409 to
any other token (see ``registry.py``).

State is in memory only: after a restart, every live instance is back within
one heartbeat because heartbeats of unknown instances answer 404.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from pdserve.bootstrap.protocol import ID_IN_USE, TOKEN_HEADER, InstanceInfo, InvalidInstanceInfo
from pdserve.bootstrap.registry import IdentityConflict, InstanceRegistry, PairingConflict
from pdserve.common import env
from pdserve.common.args import add_dataclass_args, config_from_args, flag, read_secret
from pdserve.common.errors import APIError
from pdserve.common.roles import Role
from pdserve.common.startup import flag_error, run_main
from pdserve.common.version import __version__
from pdserve.web.auth import BearerAuthMiddleware, redacted
from pdserve.web.errors import install_error_handlers, read_json_object
from pdserve.web.service import serve_app

logger = logging.getLogger("pdserve.bootstrap")


@dataclass(frozen=True)
class BootstrapConfig:
    host: str = field(default="127.0.0.1", metadata=flag("HTTP bind address"))
    port: int = field(default=8998, metadata=flag("HTTP port"))
    ttl_s: float = field(default=10.0, metadata=flag("forget an instance this many seconds after its last heartbeat"))
    log_level: str = field(default="info", metadata=flag("logging level", choices=("debug", "info", "warning", "error")))
    cluster_secret: str | None = field(default=None, repr=False, metadata=flag(
        "require Authorization: Bearer SECRET on every endpoint but /health (visible in `ps`: prefer "
        "--cluster-secret-file or $PDSERVE_CLUSTER_SECRET)"))
    cluster_secret_file: str | None = field(default=None, metadata=flag("file holding the cluster secret"))


def create_app(config: BootstrapConfig, registry: InstanceRegistry | None = None) -> FastAPI:
    registry = registry or InstanceRegistry(config.ttl_s)
    app = FastAPI(title="pdserve bootstrap")
    app.state.registry = registry
    install_error_handlers(app)
    if config.cluster_secret:
        app.add_middleware(BearerAuthMiddleware, key=config.cluster_secret, open_paths=("/health",),
                           message="invalid or missing cluster secret (expected 'Authorization: Bearer SECRET')")
    _membership_routes(app, registry, config.ttl_s)
    _lookup_routes(app, registry)
    _info_routes(app, registry, config)
    return app


def _info_routes(app: FastAPI, registry: InstanceRegistry, config: BootstrapConfig) -> None:
    started_s = time.monotonic()

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        live = registry.list()
        return {
            "role": "bootstrap",
            "version": __version__,
            "config": redacted(dataclasses.asdict(config)),
            "uptime_s": time.monotonic() - started_s,
            "num_instances": len(live),
            "num_instances_by_role": {role: sum(i.role == role for i in live) for role in Role.names()},
            "models": sorted({i.model for i in live}),
        }


def _membership_routes(app: FastAPI, registry: InstanceRegistry, ttl_s: float) -> None:
    @app.post("/register")
    async def register(request: Request) -> dict[str, Any]:
        try:
            info = InstanceInfo.from_json(await read_json_object(request))
        except InvalidInstanceInfo as exc:
            raise APIError(400, str(exc), exc.param) from None
        try:
            registry.register(info, _token(request))
        except IdentityConflict as exc:
            logger.warning("refused registration: %s", exc)
            raise APIError(409, str(exc), "instance_id", ID_IN_USE) from None
        except PairingConflict as exc:
            logger.warning("refused registration: %s", exc)
            raise APIError(409, str(exc)) from None
        logger.info("registered %s %s at %s", info.role, info.instance_id, info.http_url)
        return {"status": "ok", "instance_id": info.instance_id, "ttl_s": ttl_s}

    @app.post("/heartbeat")
    async def heartbeat(request: Request) -> dict[str, Any]:
        instance_id = (await read_json_object(request)).get("instance_id")
        if not isinstance(instance_id, str) or not instance_id:
            raise APIError(400, "field 'instance_id' must be a non-empty string", "instance_id")
        if not _as_owner(registry.heartbeat, instance_id, request):
            raise APIError(404, f"instance '{instance_id}' is not registered; register again")
        return {"status": "ok"}

    @app.delete("/instances/{instance_id}")
    async def delete_instance(instance_id: str, request: Request) -> dict[str, Any]:
        if not _as_owner(registry.delete, instance_id, request):
            raise APIError(404, f"instance '{instance_id}' is not registered")
        logger.info("deregistered %s", instance_id)
        return {"status": "ok", "instance_id": instance_id}


def _token(request: Request) -> str | None:
    return request.headers.get(TOKEN_HEADER) or None


def _as_owner(change: Callable[[str, str | None], bool], instance_id: str, request: Request) -> bool:
    """``change(instance_id, token)`` (a heartbeat, a delete): whether the id was live;
    a 409 when another process's token holds it."""
    try:
        return change(instance_id, _token(request))
    except IdentityConflict as exc:
        raise APIError(409, str(exc), "instance_id", ID_IN_USE) from None


def _lookup_routes(app: FastAPI, registry: InstanceRegistry) -> None:
    @app.get("/instances")
    async def list_instances(role: str | None = None) -> list[dict[str, Any]]:
        if role is not None and role not in Role.names():
            raise APIError(400, f"role must be one of {', '.join(Role.names())}, got '{role}'", "role")
        return [info.to_json() for info in registry.list(role)]

    @app.get("/instances/{instance_id}")
    async def get_instance(instance_id: str) -> dict[str, Any]:
        info = registry.get(instance_id)
        if info is None:
            raise APIError(404, f"instance '{instance_id}' is not registered")
        return info.to_json()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "num_instances": len(registry.list())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve bootstrap",
                                     description="Run the bootstrap registry every PD instance registers with.")
    add_dataclass_args(parser, BootstrapConfig)
    return parser


def parse_args(argv: list[str]) -> BootstrapConfig:
    parser = build_parser()
    config = config_from_args(BootstrapConfig, parser.parse_args(argv))
    try:
        secret = read_secret(config.cluster_secret, config.cluster_secret_file, env.CLUSTER_SECRET,
                             "--cluster-secret")
    except ValueError as exc:
        flag_error(parser.prog, str(exc))
    return replace(config, cluster_secret=secret)


def main(argv: list[str]) -> int:
    config = parse_args(argv)
    return run_main("pdserve bootstrap", lambda: _serve(config))


def _serve(config: BootstrapConfig) -> int:
    def build() -> FastAPI:
        logger.info("bootstrap service on http://%s:%d (ttl %.1fs, %s)", config.host, config.port, config.ttl_s,
                    "cluster secret required" if config.cluster_secret else "open: no cluster secret")
        return create_app(config)

    return serve_app(config, build)
