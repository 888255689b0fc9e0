"""In-process tests of the transfer layer's pure parts: descriptors, rooms,
the backend registry and KVMemory."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from pdserve.common.kv_layout import KVLayout
from pdserve.tests.support.clock import FakeClock
from pdserve.transfer.base import (
    TRANSFER_BACKENDS,
    KVMemory,
    LayoutMismatchError,
    RoomState,
    TransferConfig,
    check_layouts,
    create_transfer_agent,
)
from pdserve.transfer.descriptors import build_descriptors, page_runs
from pdserve.transfer.rooms import ChunkTracker, QuiescenceClock, RoomTable

LAYOUT = KVLayout(num_layers=2, num_pages=16, page_size=4, num_kv_heads=2, head_dim=8, dtype="float32")


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    runs = page_runs(src, dst)
    return list(zip(runs.src_starts.tolist(), runs.dst_starts.tolist(), runs.lengths.tolist()))


def test_merge_runs_needs_both_sides_consecutive():
    assert _runs([1, 2, 3, 7], [4, 5, 6, 9]) == [(1, 4, 3), (7, 9, 1)]
    # src consecutive but dst not: no merge
    assert _runs([1, 2], [5, 3]) == [(1, 5, 1), (2, 3, 1)]
    assert _runs([5, 6, 7], [2, 3, 4]) == [(5, 2, 3)]
    assert _runs([], []) == []
    with pytest.raises(ValueError):
        page_runs([1, 2], [3])


def test_descriptors_cover_every_region_with_each_sides_offsets():
    dst_layout = replace(LAYOUT, num_pages=32)  # the decode side has more pages
    descs = build_descriptors([1, 2, 3, 7], [4, 5, 6, 9], LAYOUT, dst_layout)
    assert len(descs) == 2 * LAYOUT.num_regions
    pb = LAYOUT.page_bytes
    assert descs.num_bytes == 4 * pb * LAYOUT.num_regions
    rows = list(zip(descs.src_offsets.tolist(), descs.dst_offsets.tolist(), descs.lengths.tolist(), strict=True))
    assert rows[0] == (LAYOUT.page_offset(0, 1), dst_layout.page_offset(0, 4), 3 * pb)
    assert rows[1] == (LAYOUT.page_offset(0, 7), dst_layout.page_offset(0, 9), pb)
    assert rows[-1] == (LAYOUT.page_offset(3, 7), dst_layout.page_offset(3, 9), pb)


def test_descriptors_reject_out_of_range_pages():
    with pytest.raises(ValueError, match="destination pages"):
        build_descriptors([0], [16], LAYOUT, LAYOUT)
    with pytest.raises(ValueError, match="source pages"):
        build_descriptors([-1], [0], LAYOUT, LAYOUT)


def test_room_table_buffers_early_news_and_drops_late_news():
    table: RoomTable[str] = RoomTable(ttl_s=60)
    table.buffer(1, "early")
    assert table.num_buffered == 1
    assert table.open(1, "handler") == ["early"]
    assert table.num_buffered == 0 and table.get(1) == "handler"
    table.close(1)
    assert table.get(1) is None and table.is_closed(1)
    table.open(2, "a")
    with pytest.raises(ValueError):
        table.open(2, "b")


def _news_and_tombstone(table: RoomTable[str], news_room: int, news: str, closed_room: int) -> None:
    """News buffered for a room not open yet, and a room that opened and closed."""
    table.buffer(news_room, news)
    table.open(closed_room, "h")
    table.close(closed_room)


def test_room_table_expires_unclaimed_news():
    clock = FakeClock()
    table: RoomTable[str] = RoomTable(ttl_s=0.01, clock=clock)
    _news_and_tombstone(table, 5, "orphan", 6)
    clock.advance(0.02)
    assert table.expire() == ["orphan"]
    assert table.num_buffered == 0 and not table.is_closed(6)


def test_chunk_tracker_needs_every_chunk_up_to_last():
    tracker = ChunkTracker()
    tracker.add(2, is_last=True)
    assert tracker.started and not tracker.complete
    tracker.add(0, is_last=False)
    assert not tracker.complete
    tracker.add(1, is_last=False)
    assert tracker.complete


def test_layout_mismatch_names_both_values():
    other = replace(LAYOUT, page_size=8, dtype="bfloat16")
    with pytest.raises(LayoutMismatchError) as info:
        check_layouts(LAYOUT, other, "P", "D")
    text = str(info.value)
    assert "page_size: P=4 vs D=8" in text and "dtype: P=float32 vs D=bfloat16" in text
    check_layouts(LAYOUT, replace(LAYOUT, num_pages=99), "P", "D")  # num_pages may differ


def test_kv_memory_from_tensor_checks_size():
    buffer = torch.zeros(LAYOUT.total_bytes // 4)
    memory = KVMemory.from_tensor(buffer, LAYOUT)
    assert (memory.base_ptr, memory.num_bytes, memory.device) == (buffer.data_ptr(), LAYOUT.total_bytes, "cpu")
    with pytest.raises(ValueError, match="smaller"):
        KVMemory.from_tensor(torch.zeros(8), LAYOUT)


def test_unknown_backend_lists_known_ones():
    memory = KVMemory.from_tensor(torch.zeros(LAYOUT.total_bytes // 4), LAYOUT)
    with pytest.raises(ValueError, match="nixl, ucx"):
        create_transfer_agent(TransferConfig(backend="carrier-pigeon"), memory)
    assert {"nixl", "ucx", "cuda_ipc"} <= set(TRANSFER_BACKENDS.names())


def test_room_state_terminality():
    assert [s.is_terminal for s in RoomState] == [False, False, False, True, True]


def test_room_table_expiry_keeps_recent_entries_in_order():
    clock = FakeClock()
    table: RoomTable[str] = RoomTable(ttl_s=0.05, clock=clock)
    _news_and_tombstone(table, 1, "old", 2)
    clock.advance(0.06)
    _news_and_tombstone(table, 3, "new", 4)
    assert table.expire() == ["old"]
    assert table.num_buffered == 1 and table.is_closed(4) and not table.is_closed(2)
    assert table.open(3, "late") == ["new"]


def test_quiescence_clock_grace_is_bounded():
    now = FakeClock()
    clock = QuiescenceClock(cap_s=60, clock=now)
    assert not clock.in_grace()
    clock.released_unreported(inflight_s=0.0)
    assert clock.in_grace()  # at least GRACE_MIN_S, however short the flight
    now.advance(QuiescenceClock.GRACE_MIN_S + 0.01)
    assert not clock.in_grace()
    clock.GRACE_MAX_S = 0.02
    clock.observe(100.0)  # a long flight seen earlier: the grace stops at the cap
    clock.released_unreported(inflight_s=0.0)
    assert clock.in_grace()
    now.advance(0.03)
    assert not clock.in_grace()


def test_quiescence_clock_caps_reported_work():
    now = FakeClock()
    clock = QuiescenceClock(cap_s=0.02, clock=now)
    assert not clock.capped(1, "work")  # nothing released yet
    clock.released_reported()
    assert not clock.capped(1, "work")
    now.advance(0.03)
    assert clock.capped(1, "work") and clock.capped(1, "work")


def test_cuda_ipc_metadata_of_a_cpu_pool_offers_no_handle():
    from pdserve.transfer.base import TransferConfig, create_transfer_agent
    from pdserve.transfer.cuda_ipc_backend import CudaIpcMetadata
    from pdserve.transfer.messages import AgentInfo, decode_as

    layout = KVLayout(num_layers=1, num_pages=4, page_size=2, num_kv_heads=1, head_dim=4, dtype="float32")
    buf = torch.zeros(layout.total_bytes // 4)
    agent = create_transfer_agent(TransferConfig(backend="cuda_ipc", instance_name="t"), KVMemory.from_tensor(buf, layout))
    try:
        info = decode_as(agent.peer_info(), AgentInfo)
        meta = decode_as(info.backend_metadata, CudaIpcMetadata)
        assert info.backend == "cuda_ipc" and meta.nixl and meta.gpu_uuid == "" and meta.storage == []
    finally:
        agent.close()


def test_cuda_ipc_run_copy_moves_exactly_the_listed_pages():
    from pdserve.transfer.cuda_ipc_backend import copy_runs

    src = torch.arange(3 * 8 * 5, dtype=torch.int64).view(3, 8, 5)
    dst = torch.full((3, 12, 5), -1, dtype=torch.int64)
    src_pages, dst_pages = [0, 1, 2, 6, 3], [9, 10, 11, 0, 4]
    copy_runs(src, dst, page_runs(src_pages, dst_pages))
    want = torch.full_like(dst, -1)
    want[:, dst_pages] = src[:, src_pages]
    assert torch.equal(dst, want)
