"""One instance's front: what its routes and start-up share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import uvicorn
from pdserve.common.config import ServerConfig
from pdserve.common.messages import EngineReady
from pdserve.server.engine_client import EngineClient
from pdserve.server.metrics import ServerMetrics
from pdserve.server.serving import Serving
from pdserve.web.auth import redacted
from pdserve.web.tracing import Tracer


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
    engine_ready: EngineReady | None = None
    server: uvicorn.Server | None = None
    tracer: Tracer = dataclasses.field(default_factory=lambda: Tracer("pdserve"))  # disabled unless configured

    def server_info(self) -> dict:
        ready = dataclasses.asdict(self.engine_ready) if self.engine_ready else {}
        config = redacted(dataclasses.asdict(self.cfg))
        return {**config, **ready, "model_dir": self.model_dir, "version": version(),
                "role": self.cfg.disaggregation_mode, "ready": self.ready, "failed": self.failed}


def version() -> str:
    from pdserve.common.version import __version__

    return __version__
