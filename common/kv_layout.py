"""The shape of an instance's KV cache memory, as both PD sides must agree on it.

The whole KV pool of an instance is ONE contiguous buffer of shape
``[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]`` (index 1 of
the second axis is K=0 / V=1). A "region" is one (layer, k-or-v) slab; page
``p`` of region ``r`` starts at ``base + (r * num_pages + p) * page_bytes``.
Everything the transfer layer needs to turn page indices into addresses is
here, and nothing else: the two sides may have different ``num_pages``.

Under tensor parallelism each rank's buffer holds ``num_kv_heads`` of the
model's ``total_kv_heads`` heads, starting at head ``head_start``
(:func:`kv_head_range`). Inside a page a token's heads are adjacent, so a
slice of heads is one run of bytes per token of the page.

A layout crosses the wire in the transfer agents' metadata (a message) and in
the bootstrap record (``to_dict``: JSON).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pdserve.common.codec import message

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


@message
@dataclass(frozen=True, kw_only=True)
class KVLayout:
    num_layers: int
    num_pages: int
    page_size: int  # tokens per page
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without the "torch." prefix
    head_start: int = 0  # the model's first KV head held here (tensor parallelism)
    total_kv_heads: int = 0  # the model's KV heads; 0: num_kv_heads (no sharding)

    @property
    def model_kv_heads(self) -> int:
        return self.total_kv_heads or self.num_kv_heads

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's heads within one page of one region."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def itemsize(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def num_regions(self) -> int:
        return self.num_layers * 2

    @property
    def page_bytes(self) -> int:
        """Bytes of one page within one region (one layer's K or V)."""
        return self.page_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def region_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_regions * self.region_bytes

    def page_offset(self, region: int, page: int) -> int:
        """Byte offset of ``page`` in ``region`` from the buffer's start."""
        return region * self.region_bytes + page * self.page_bytes

    def pairing_fields(self) -> dict[str, object]:
        """The fields that must be equal on a prefill and a decode instance
        (the model's KV heads, not how many one rank holds: any TP sizes pair)."""
        return {
            "page_size": self.page_size,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "num_kv_heads": self.model_kv_heads,
            "head_dim": self.head_dim,
        }

    def mismatch(self, other: KVLayout, self_name: str = "this", other_name: str = "peer") -> str | None:
        """A message naming every differing field with both values, or None."""
        mine, theirs = self.pairing_fields(), other.pairing_fields()
        diffs = [
            f"{key}: {self_name}={mine[key]} vs {other_name}={theirs[key]}"
            for key in mine
            if mine[key] != theirs[key]
        ]
        if not diffs:
            return None
        return "KV layout mismatch (" + "; ".join(diffs) + ")"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> KVLayout:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})  # type: ignore[arg-type]


def kv_head_range(total_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """(first head, number of heads) of the KV heads rank ``rank`` holds.

    With at least as many heads as ranks each rank holds an equal share; with
    more ranks than heads each head is replicated on ``tp_size / total`` ranks
    that hold it alone (as vLLM does)."""
    if tp_size <= total_kv_heads:
        if total_kv_heads % tp_size:
            raise ValueError(f"{total_kv_heads} KV heads do not split over --tp-size {tp_size}")
        count = total_kv_heads // tp_size
        return rank * count, count
    if tp_size % total_kv_heads:
        raise ValueError(f"--tp-size {tp_size} is not a multiple of the model's {total_kv_heads} KV heads")
    return rank // (tp_size // total_kv_heads), 1
