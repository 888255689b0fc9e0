"""The router's configuration: frozen dataclasses that are also ``pdserve router``'s flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.args import flag
from pdserve.common.stats import DEFAULT_LATENCY_BUCKETS_S

MODES = ("auto", "pd", "colocated")


@dataclass(frozen=True)
class CacheAwareConfig:
    """Knobs of the cache_aware policy (SGLang's names and defaults)."""

    cache_threshold: float = field(default=0.3, metadata=flag("cache_aware: route by prefix only above this match ratio"))
    balance_abs_threshold: int = field(default=64, metadata=flag("cache_aware: a load gap this large counts as imbalanced ..."))
    balance_rel_threshold: float = field(default=1.5, metadata=flag("... when it is also this many times the smallest load"))
    max_tree_chars: int = field(default=4_000_000, metadata=flag("cache_aware: prefix-tree characters kept per worker (LRU)"))


@dataclass(frozen=True)
class RouterConfig:
    host: str = field(default="127.0.0.1", metadata=flag("HTTP bind address"))
    port: int = field(default=30000, metadata=flag("HTTP port"))
    prefill_urls: tuple[str, ...] = field(default=(), metadata=flag(
        "prefill instance URL(s)", flag="--prefill", nargs="+", action="extend", metavar="URL"))
    decode_urls: tuple[str, ...] = field(default=(), metadata=flag(
        "decode instance URL(s)", flag="--decode", nargs="+", action="extend", metavar="URL"))
    worker_urls: tuple[str, ...] = field(default=(), metadata=flag(
        "colocated instance URL(s); selects colocated mode", flag="--worker", nargs="+", action="extend", metavar="URL"))
    bootstrap_url: str | None = field(default=None, metadata=flag("discover instances from this bootstrap service"))
    mode: str = field(default="auto", metadata=flag(
        "auto: colocated when --worker is given, else pd", choices=MODES))
    policy: str = field(default="cache_aware", metadata=flag("load-balancing policy of both roles"))
    prefill_policy: str | None = field(default=None, metadata=flag("prefill policy (default: --policy)"))
    decode_policy: str | None = field(default=None, metadata=flag("decode policy (default: --policy)"))
    cache_aware: CacheAwareConfig = field(default=CacheAwareConfig(), metadata=flag("", nested=True))
    api_key: str | None = field(default=None, metadata=flag("require Authorization: Bearer KEY on every endpoint but /health"))
    health_check_interval_s: float = field(default=5.0, metadata=flag("seconds between health checks of each worker"))
    health_check_timeout_s: float = field(default=5.0, metadata=flag("seconds a health check may take"))
    request_timeout_s: float = field(default=600.0, metadata=flag("seconds one upstream request may take"))
    max_retries: int = field(default=2, metadata=flag("retries on another worker pair while no byte reached the client"))
    log_level: str = field(default="info", metadata=flag("logging level", choices=("debug", "info", "warning", "error")))
    bucket_e2e_request_latency: tuple[float, ...] = field(default=DEFAULT_LATENCY_BUCKETS_S, metadata=flag(
        "histogram buckets of the router's request, per-worker and per-stage latencies, in seconds", nargs="+", type=float, metavar="SECONDS"))
    otlp_traces_endpoint: str | None = field(default=None, metadata=flag(
        "export a span per request over OTLP/HTTP here and pass its context on to the workers (default: no traces)"))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "auto":  # resolved once, here: every reader sees pd or colocated
            object.__setattr__(self, "mode", "colocated" if self.worker_urls else "pd")
        if self.mode == "colocated" and (self.prefill_urls or self.decode_urls):
            raise ValueError("--worker (colocated) cannot be mixed with --prefill/--decode")
        if self.mode == "pd" and self.worker_urls:
            raise ValueError("--worker URLs need colocated mode")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not self.bucket_e2e_request_latency or min(self.bucket_e2e_request_latency) <= 0:
            raise ValueError("--bucket-e2e-request-latency needs positive bucket bounds")

    @property
    def resolved_prefill_policy(self) -> str:
        return self.prefill_policy or self.policy

    @property
    def resolved_decode_policy(self) -> str:
        return self.decode_policy or self.policy
