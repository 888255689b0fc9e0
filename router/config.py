"""The router's configuration: frozen dataclasses that are also ``pdserve router``'s flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.args import flag
from pdserve.common.config import DEFAULT_MAX_REQUEST_BYTES
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
    http_keep_alive_timeout_s: float = field(default=5.0, metadata=flag("close a kept-alive client connection idle this long between requests"))
    http_read_timeout_s: float = field(default=30.0, metadata=flag("close a client connection whose request (headers or body) gets no byte for this long"))
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
    api_key: str | None = field(default=None, repr=False, metadata=flag(
        "require Authorization: Bearer KEY on every endpoint but /health (default: $PDSERVE_API_KEY)"))
    worker_api_key: str | None = field(default=None, repr=False, metadata=flag(
        "the key the router presents to its workers (default: --api-key)"))
    open_metrics: bool = field(default=False, metadata=flag("with --api-key: serve /metrics without the key too (a scraper's)"))
    cluster_secret: str | None = field(default=None, repr=False, metadata=flag(
        "the secret the bootstrap service wants, for --bootstrap-url (visible in `ps`: prefer "
        "--cluster-secret-file or $PDSERVE_CLUSTER_SECRET)"))
    cluster_secret_file: str | None = field(default=None, metadata=flag("file holding the cluster secret"))
    health_check_interval_s: float = field(default=5.0, metadata=flag("seconds between health checks of each worker"))
    health_check_timeout_s: float = field(default=5.0, metadata=flag("seconds a health check may take"))
    request_timeout_s: float = field(default=600.0, metadata=flag("seconds one upstream request may take"))
    max_retries: int = field(default=2, metadata=flag("retries on another worker pair while no byte reached the client"))
    first_byte_timeout_s: float = field(default=10.0, metadata=flag(
        "seconds an attempt may go without its first byte before the router probes its prefill and decode "
        "(/health) and moves to another pair if one does not answer; 0 waits for --request-timeout-s"))
    health_failure_threshold: int = field(default=3, metadata=flag(
        "consecutive failed checks (or failed requests) before a worker is marked down"))
    health_success_threshold: int = field(default=2, metadata=flag(
        "consecutive successful checks before a worker that was marked down is back"))
    max_request_bytes: int = field(default=DEFAULT_MAX_REQUEST_BYTES, metadata=flag("refuse (413) request bodies larger than this"))
    max_concurrent_requests: int | None = field(default=None, metadata=flag(
        "generation requests in flight at once; more wait in the queue (default: no limit; "
        "with --processes, shared evenly among them)"))
    queue_size: int = field(default=100, metadata=flag(
        "requests that may wait for --max-concurrent-requests; more get 429 (with --processes, shared evenly)"))
    processes: int = field(default=1, metadata=flag(
        "router processes on --port: one relays about 40-60k tokens/s on one core; the kernel spreads "
        "connections among them, each keeps its own worker view and policy state, /metrics sums them"))
    queue_timeout_s: float = field(default=60.0, metadata=flag("seconds a request may wait in the queue before a 408"))
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
        if self.first_byte_timeout_s < 0:
            raise ValueError("first_byte_timeout_s must be >= 0")
        if self.health_failure_threshold < 1 or self.health_success_threshold < 1:
            raise ValueError("health thresholds must be >= 1")
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be >= 1")
        if self.max_concurrent_requests is not None and self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1 (or unset: no limit)")
        if self.processes < 1:
            raise ValueError("--processes must be >= 1")
        if self.queue_size < 0 or self.queue_timeout_s <= 0:
            raise ValueError("queue_size must be >= 0 and queue_timeout_s > 0")
        if not self.bucket_e2e_request_latency or min(self.bucket_e2e_request_latency) <= 0:
            raise ValueError("--bucket-e2e-request-latency needs positive bucket bounds")

    def per_process(self, count: int) -> int:
        """A router-wide limit's share of one of ``--processes`` processes (rounded up)."""
        return -(-count // self.processes)

    @property
    def resolved_worker_api_key(self) -> str | None:
        return self.worker_api_key or self.api_key

    @property
    def resolved_prefill_policy(self) -> str:
        return self.prefill_policy or self.policy

    @property
    def resolved_decode_policy(self) -> str:
        return self.decode_policy or self.policy
