"""The router's configuration: one frozen dataclass, filled by ``pdserve router``."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("pd", "colocated")


@dataclass(frozen=True)
class CacheAwareConfig:
    """Knobs of the cache_aware policy (SGLang's names and defaults)."""

    cache_threshold: float = 0.3  # route by prefix only above this match ratio
    balance_abs_threshold: int = 64  # load gap that counts as imbalanced ...
    balance_rel_threshold: float = 1.5  # ... when also this many times the minimum
    max_tree_chars: int = 4_000_000  # per worker; least recently used leaves go first


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    prefill_urls: tuple[str, ...] = ()
    decode_urls: tuple[str, ...] = ()
    worker_urls: tuple[str, ...] = ()  # colocated instances
    bootstrap_url: str | None = None  # discover instances from the bootstrap service
    mode: str = "pd"  # "pd" | "colocated"; the CLI resolves "auto" from the URLs given
    policy: str = "cache_aware"
    prefill_policy: str | None = None  # None: same as ``policy``
    decode_policy: str | None = None
    cache_aware: CacheAwareConfig = CacheAwareConfig()
    api_key: str | None = None
    health_check_interval_s: float = 5.0
    health_check_timeout_s: float = 5.0
    request_timeout_s: float = 600.0
    max_retries: int = 2
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "colocated" and (self.prefill_urls or self.decode_urls):
            raise ValueError("--worker (colocated) cannot be mixed with --prefill/--decode")
        if self.mode == "pd" and self.worker_urls:
            raise ValueError("--worker URLs need colocated mode")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    @property
    def resolved_prefill_policy(self) -> str:
        return self.prefill_policy or self.policy

    @property
    def resolved_decode_policy(self) -> str:
        return self.decode_policy or self.policy
