"""Configuration of one serving instance (engine + HTTP front).

Every field is a command-line flag of ``pdserve serve`` with SGLang's name;
``common/args.py`` builds the parser from these fields, so defaults live here
only. ``None`` means "resolve automatically" and is resolved at parse time
(``resolve``) or, for values that need the model or the device, at engine start.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass, field, fields, replace

from pdserve.common import env
from pdserve.common.args import flag as _flag
from pdserve.common.args import read_secret
from pdserve.common.roles import Role
from pdserve.common.stats import DEFAULT_LATENCY_BUCKETS_S

# 16 MiB: a whole 128k-token context as JSON text even at ~64 bytes a token
# (escaped non-ASCII text costs 6 bytes a character), or a 1M-token prompt as
# token ids (at most 8 bytes each, separator included), with room to spare; far
# below what would let one request hold a front's memory or CPU for long.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


def _buckets(what: str) -> dict[str, object]:
    return _flag(f"histogram buckets of {what}, in seconds", nargs="+", type=float, metavar="SECONDS")


@dataclass(frozen=True)
class MetricsConfig:
    """Histogram buckets of the Prometheus metrics (SGLang's flag names), and traces."""

    bucket_time_to_first_token: tuple[float, ...] = field(default=DEFAULT_LATENCY_BUCKETS_S, metadata=_buckets("pdserve:time_to_first_token_seconds"))
    bucket_inter_token_latency: tuple[float, ...] = field(default=DEFAULT_LATENCY_BUCKETS_S, metadata=_buckets("pdserve:inter_token_latency_seconds"))
    bucket_e2e_request_latency: tuple[float, ...] = field(default=DEFAULT_LATENCY_BUCKETS_S, metadata=_buckets("pdserve:e2e_request_latency_seconds"))
    bucket_kv_transfer_latency: tuple[float, ...] = field(default=DEFAULT_LATENCY_BUCKETS_S, metadata=_buckets("pdserve:kv_transfer_latency_seconds"))
    bucket_per_stage_req_latency: tuple[float, ...] = field(default=DEFAULT_LATENCY_BUCKETS_S, metadata=_buckets("pdserve:per_stage_req_latency_seconds"))
    otlp_traces_endpoint: str | None = field(default=None, metadata=_flag(
        "export each request's spans over OTLP/HTTP here, e.g. http://127.0.0.1:4318/v1/traces (default: no traces)"))

    def __post_init__(self) -> None:
        for f in fields(self):
            if not f.name.startswith("bucket_"):
                continue
            value = getattr(self, f.name)
            if not value or any(b <= 0 for b in value):
                raise ValueError(f"--{f.name.replace('_', '-')} needs positive bucket bounds")


@dataclass(frozen=True)
class ServerConfig:
    # Model and weights.
    model_path: str | None = field(default=None, metadata=_flag("HF model directory or built-in preset (default: tiny)"))
    tokenizer_path: str | None = field(default=None, metadata=_flag("tokenizer directory (default: the model's)"))
    load_format: str = field(default="auto", metadata=_flag("auto: safetensors weights; dummy: random weights", choices=("auto", "dummy")))
    dtype: str = field(default="auto", metadata=_flag("weight/activation dtype", choices=("auto", "bfloat16", "float16", "float32")))
    device: str = field(default="auto", metadata=_flag("auto picks cuda when available", choices=("auto", "cpu", "cuda")))
    base_gpu_id: int = field(default=0, metadata=_flag("CUDA device index of rank 0"))
    # Tensor parallelism: one engine process per rank (see docs/architecture.md).
    tp_size: int = field(default=1, metadata=_flag("tensor parallel ranks of this instance", aliases=("--tp",)))
    gpu_id_step: int = field(default=1, metadata=_flag("rank r uses GPU base-gpu-id + r * gpu-id-step"))
    nccl_port: int | None = field(default=None, metadata=_flag("port of the ranks' rendezvous (default: a free port)"))
    dist_init_addr: str | None = field(default=None, metadata=_flag("host:port of the ranks' rendezvous (default: 127.0.0.1:--nccl-port)"))
    dist_timeout_s: float = field(default=60.0, metadata=_flag("seconds a collective waits for a peer rank before the instance fails"))
    served_model_name: str | None = field(default=None, metadata=_flag("model name in the API (default: model path)"))
    context_length: int | None = field(default=None, metadata=_flag("max tokens per request (default: model's max_position_embeddings)"))
    random_seed: int = field(default=0, metadata=_flag("seed for unseeded sampling and dummy weights"))
    chat_template: str | None = field(default=None, metadata=_flag("jinja chat template file or string overriding the tokenizer's"))
    # HTTP.
    host: str = field(default="127.0.0.1", metadata=_flag("HTTP bind address"))
    port: int = field(default=30000, metadata=_flag("HTTP port"))
    http_keep_alive_timeout_s: float = field(default=5.0, metadata=_flag("close a kept-alive client connection idle this long between requests"))
    http_read_timeout_s: float = field(default=30.0, metadata=_flag("close a client connection whose request (headers or body) gets no byte for this long"))
    api_key: str | None = field(default=None, repr=False, metadata=_flag(
        "require Authorization: Bearer KEY on every endpoint but /health (default: $PDSERVE_API_KEY)"))
    enable_metrics: bool = field(default=False, metadata=_flag("serve Prometheus metrics on /metrics"))
    open_metrics: bool = field(default=False, metadata=_flag("with --api-key: serve /metrics without the key too (a scraper's)"))
    log_level: str = field(default="info", metadata=_flag("logging level", choices=("debug", "info", "warning", "error")))
    log_requests: bool = field(default=False, metadata=_flag("log every request's input and output"))
    skip_server_warmup: bool = field(default=False, metadata=_flag("do not send a warmup request before reporting healthy"))
    max_queued_requests: int | None = field(default=None, metadata=_flag("reject (503) new requests beyond this many waiting"))
    max_request_bytes: int = field(default=DEFAULT_MAX_REQUEST_BYTES, metadata=_flag("refuse (413) request bodies larger than this"))
    allow_auto_truncate: bool = field(default=False, metadata=_flag("truncate over-long prompts instead of rejecting them"))
    stream_interval: int = field(default=1, metadata=_flag("stream every N tokens"))
    watchdog_timeout: float = field(default=300.0, metadata=_flag("seconds a busy engine step may take before the instance reports unhealthy and exits"))
    # KV pool and scheduling.
    page_size: int = field(default=16, metadata=_flag("tokens per KV page"))
    max_total_tokens: int | None = field(default=None, metadata=_flag("KV pool size in tokens (default: from memory)"))
    mem_fraction_static: float | None = field(default=None, metadata=_flag("fraction of device memory for weights + KV pool"))
    chunked_prefill_size: int = field(default=8192, metadata=_flag("max prompt tokens of one request per prefill step; -1 disables chunking"))
    max_prefill_tokens: int = field(default=16384, metadata=_flag("max new tokens in one prefill batch"))
    max_running_requests: int | None = field(default=None, metadata=_flag("max requests decoding at once"))
    schedule_policy: str = field(default="fcfs", metadata=_flag(
        "waiting-queue order: fcfs, or lpm (longest cached prefix first; arrival order while over 128 wait)",
        choices=("fcfs", "lpm")))
    schedule_conservativeness: float = field(default=1.0, metadata=_flag("higher reserves more room for future tokens"))
    disable_radix_cache: bool = field(default=False, metadata=_flag("disable the prefix cache"))
    decode_log_interval: int = field(default=40, metadata=_flag("log a decode batch line every N decode steps"))
    attention_backend: str | None = field(default=None, metadata=_flag("torch | flashinfer | triton (default: flashinfer on GPU, torch on CPU)"))
    # GPU execution.
    disable_cuda_graph: bool = field(default=False, metadata=_flag("run decode without CUDA graphs"))
    cuda_graph_max_bs: int | None = field(default=None, metadata=_flag("largest decode batch captured in a CUDA graph"))
    cuda_graph_bs: tuple[int, ...] | None = field(default=None, metadata=_flag("decode batch sizes to capture", nargs="+", type=int))
    disable_cuda_graph_padding: bool = field(default=False, metadata=_flag("only replay graphs for exactly captured batch sizes"))
    disable_prefill_cuda_graph: bool = field(default=False, metadata=_flag("launch prefill steps eagerly instead of replaying CUDA graphs (GPU; the graphs' memory, about one forward of --prefill-cuda-graph-max-tokens, is logged at start)"))
    prefill_cuda_graph_max_tokens: int | None = field(default=None, metadata=_flag("largest prefill step (new tokens) captured in a CUDA graph (default: --chunked-prefill-size, at most 8192; never past the context length; longer steps launch eagerly)"))
    prefill_cuda_graph_max_seqs: int = field(default=16, metadata=_flag("most sequences of a prefill step that replays a CUDA graph"))
    disable_overlap_schedule: bool = field(default=False, metadata=_flag("do not prepare the next batch while the GPU runs"))
    disable_pdl: bool = field(default=False, metadata=_flag("launch our GPU kernels without programmatic dependent launch (Hopper and newer chain them by default)"))
    poll_pipe_max_requests: int = field(default=8, metadata=_flag(
        "GPU: while at most this many requests are open, the front polls the pipe to its engine instead of sleeping "
        "on it, and the engine polls it while idle: one busy core each (an idle server shows its engine at 100%%), ~0.35 ms "
        "less time to first token; with more open requests both sleep: each wake then serves many events, and a "
        "front always polling read less output throughput at 128 on an H100 (0: never poll)"))
    # Disaggregation.
    disaggregation_mode: Role = field(default=Role.COLOCATED, metadata=_flag("instance role: null (colocated), prefill or decode"))
    disaggregation_bootstrap_url: str | None = field(default=None, metadata=_flag("bootstrap service URL, e.g. http://127.0.0.1:8998"))
    disaggregation_transfer_backend: str = field(default="nixl", metadata=_flag(
        "KV transfer backend; cuda_ipc = nixl plus direct copies to a decode instance on the same GPU",
))
    disaggregation_ib_device: str | None = field(default=None, metadata=_flag("RDMA device(s) for UCX, e.g. mlx5_0"))
    disaggregation_control_host: str | None = field(default=None, metadata=_flag("address the PD control channel binds (default: --host)"))
    disaggregation_control_port: int = field(default=0, metadata=_flag("PD control channel port (0: pick a free one)"))
    disaggregation_timeout_s: float = field(default=60.0, metadata=_flag("seconds a room may wait for its peer before it fails"))
    disaggregation_heartbeat_s: float = field(default=2.0, metadata=_flag("seconds between bootstrap heartbeats"))
    disaggregation_poll_interval_ms: float | None = field(default=None, metadata=_flag(
        "how often an instance with nothing to run checks its rooms in flight (default: 0.1 on GPU, 2 on CPU)"))
    instance_id: str | None = field(default=None, metadata=_flag("instance id in the bootstrap registry (default: random)"))
    cluster_secret: str | None = field(default=None, repr=False, metadata=_flag(
        "the secret the bootstrap service wants (visible in `ps`: prefer --cluster-secret-file or "
        "$PDSERVE_CLUSTER_SECRET)"))
    cluster_secret_file: str | None = field(default=None, metadata=_flag("file holding the cluster secret"))
    # Metrics.
    metrics: MetricsConfig = field(default=MetricsConfig(), metadata=_flag("", nested=True))

    def __post_init__(self) -> None:
        object.__setattr__(self, "disaggregation_mode", Role(self.disaggregation_mode))  # its name works too

    def pipe_poll_limit(self, device: str) -> int:
        """Most open requests at which the front polls the pipe to its engine
        (and the engine polls it while idle) rather than sleep on it
        (``--poll-pipe-max-requests``): 0 off GPU, where the model needs the
        cores; a GPU host has cores to spare."""
        return self.poll_pipe_max_requests if device.startswith("cuda") else 0

    def resolve(self) -> ServerConfig:
        """Fill the ``auto`` values that need neither the model nor a device."""
        updates: dict[str, object] = {}
        if self.instance_id is None:
            updates["instance_id"] = f"{self.disaggregation_mode}-{uuid.uuid4().hex[:12]}"
        if self.disaggregation_control_host is None:
            updates["disaggregation_control_host"] = self.host
        if self.api_key is None:
            updates["api_key"] = env.API_KEY.get()
        updates["cluster_secret"] = read_secret(
            self.cluster_secret, self.cluster_secret_file, env.CLUSTER_SECRET, "--cluster-secret")
        if self.tp_size > 1 and self.dist_init_addr is None and self.nccl_port is None:
            updates["nccl_port"] = _free_port()
        return replace(self, **updates) if updates else self

    def validate(self) -> None:
        if self.tp_size < 1 or self.gpu_id_step < 1:
            raise ValueError("--tp-size and --gpu-id-step must be >= 1")
        if self.page_size < 1:
            raise ValueError("--page-size must be >= 1")
        if self.disaggregation_mode.is_pd and not self.disaggregation_bootstrap_url:
            raise ValueError("--disaggregation-bootstrap-url is required in prefill and decode mode")
        if self.max_request_bytes < 1:
            raise ValueError("--max-request-bytes must be >= 1")
        if self.stream_interval < 1:
            raise ValueError("--stream-interval must be >= 1")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError("--chunked-prefill-size must be positive or -1")
        if self.disaggregation_poll_interval_ms is not None and self.disaggregation_poll_interval_ms <= 0:
            raise ValueError("--disaggregation-poll-interval-ms must be positive")
        if self.prefill_cuda_graph_max_tokens is not None and self.prefill_cuda_graph_max_tokens < 1:
            raise ValueError("--prefill-cuda-graph-max-tokens must be positive")
        if self.prefill_cuda_graph_max_seqs < 1:
            raise ValueError("--prefill-cuda-graph-max-seqs must be positive")
        if self.poll_pipe_max_requests < 0:
            raise ValueError("--poll-pipe-max-requests must be >= 0")


def rendezvous_address(cfg: ServerConfig) -> str:
    """``host:port`` where the ranks of one instance meet."""
    return cfg.dist_init_addr or f"127.0.0.1:{cfg.nccl_port}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served_model_name(cfg: ServerConfig) -> str:
    """The model id clients use; the built-in default is called ``tiny``."""
    return cfg.served_model_name or cfg.model_path or "tiny"
