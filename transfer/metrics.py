"""The KV transfer numbers both PD roles keep, named as SGLang and vLLM name them.

Each role owns one :class:`TransferMetrics`; the front exports its snapshot as
``pdserve:<name>`` (counters get Prometheus' ``_total``). Bytes are counted when
a room's transfer succeeded, so after N rooms both sides have counted exactly
the pages of those prompts times ``KVLayout.bytes_per_page``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.common.kv_layout import KVLayout
from pdserve.common.stats import DESCRIPTOR_BUCKETS, StatsBook, StatsSnapshot

# Gauges of each role's queues (SGLang's names).
PREFILL_QUEUES = {
    "num_prefill_bootstrap_queue_reqs": "Rooms waiting for their peer: the request or D's page list",
    "num_prefill_inflight_queue_reqs": "Rooms prefilled whose KV is still being written to D",
    "num_prefill_draining_rooms": "Rooms ended early whose writes may still be in flight",
}
DECODE_QUEUES = {
    "num_decode_prealloc_queue_reqs": "Requests waiting for KV pages to be reserved (prealloc)",
    "num_decode_transfer_queue_reqs": "Rooms whose KV is being written by P (waiting for KV)",
    "num_decode_quarantined_rooms": "Rooms ended early whose pages wait until no write can land",
}


def bytes_per_page(layout: KVLayout) -> int:
    """Bytes of one page across every layer's K and V: what moving one page costs."""
    return layout.page_bytes * layout.num_regions


class TransferMetrics:
    def __init__(self, queues: dict[str, str], latency_buckets_s: Sequence[float]) -> None:
        book = self.book = StatsBook()
        book.counter("kv_transfers", "KV transfers (rooms) completed")
        book.counter("kv_transfer_bytes", "KV bytes moved by completed transfers")
        book.counter("kv_transfer_failures", "KV transfers that failed (error, timeout, lost peer)")
        book.counter("num_bootstrap_failed_reqs", "PD requests that failed before their transfer could start")
        book.gauge("kv_transfer_speed_gb_s", "Speed of the last completed KV transfer, GB/s")
        book.histogram("kv_transfer_latency_seconds", "From a room's first posted write to its success (prefill side)",
                       latency_buckets_s)
        book.histogram("kv_transfer_num_descriptors", "Descriptors posted per KV transfer", DESCRIPTOR_BUCKETS)
        for name, help_text in queues.items():
            book.gauge(name, help_text)

    def transferred(self, num_bytes: int, latency_s: float | None = None, num_descriptors: int | None = None) -> None:
        book = self.book
        book.inc("kv_transfers")
        book.inc("kv_transfer_bytes", num_bytes)
        if latency_s is not None:
            book.observe("kv_transfer_latency_seconds", latency_s)
            book.set("kv_transfer_speed_gb_s", num_bytes / max(latency_s, 1e-9) / 1e9)
        if num_descriptors is not None:
            book.observe("kv_transfer_num_descriptors", num_descriptors)

    def failed(self) -> None:
        self.book.inc("kv_transfer_failures")

    def bootstrap_failed(self) -> None:
        self.book.inc("num_bootstrap_failed_reqs")

    def snapshot(self, queues: dict[str, int]) -> StatsSnapshot:
        for name, value in queues.items():
            self.book.set(name, value)
        return self.book.snapshot()
