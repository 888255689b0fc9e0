"""One instance's front: what its routes and start-up share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import uvicorn
from pdserve.common.config import ServerConfig
from pdserve.server.engine_client import EngineClient
from pdserve.server.metrics import ServerMetrics
from pdserve.server.serving import Serving


@dataclass
class AppState:
    cfg: ServerConfig
    model_dir: str
    model_name: str
    tokenizer: object
    engine: EngineClient
    metrics: ServerMetrics
    serving: Serving | None = None
    ready: bool = False
    failed: str | None = None
    info: dict = field(default_factory=dict)
    server: uvicorn.Server | None = None

    def server_info(self) -> dict:
        return {**dataclasses.asdict(self.cfg), **self.info, "model_dir": self.model_dir, "version": version()}


def version() -> str:
    from pdserve import __version__

    return __version__
