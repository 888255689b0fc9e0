"""Every transfer backend against the same contract, prefill and decode agents
in separate processes writing between CPU tensors (and, marked ``gpu``, between
CUDA tensors on the device machine).

One module-scoped trio of processes per backend (P, D1, D2) is shared by the
cases; each case uses fresh random room ids and refills the buffers.
"""

from __future__ import annotations

import importlib.util
import random
import time
from dataclasses import dataclass, replace

import numpy as np
import pytest
from pdserve.common.codec import encode
from pdserve.common.kv_layout import KVLayout
from pdserve.tests.support.waiting import wait_until
from pdserve.transfer.base import LayoutMismatchError, RoomState
from pdserve.transfer.harness import AgentProcess, Command, WorkerSpec, start_agents
from pdserve.transfer.messages import AgentInfo, decode_as

# 4 KiB pages: single pages go eagerly, runs of 3+ pages take UCX's rendezvous path.
LAYOUT = KVLayout(num_layers=2, num_pages=16, page_size=8, num_kv_heads=2, head_dim=64, dtype="float32")
SENTINEL = -1.0
WAIT_S = 20.0
SUCCESS, FAILED = int(RoomState.SUCCESS), int(RoomState.FAILED)


@dataclass
class Cluster:
    p: AgentProcess
    d1: AgentProcess
    d2: AgentProcess
    p_name: str
    d1_name: str
    d2_name: str
    d1_info: bytes
    backend: str
    device: str


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


_GPU = [pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="needs CUDA")]
# The GPU machine carries nixl but not ucxx; CI (CPU) has both.
_UCXX = [pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="needs ucxx")]


@pytest.fixture(
    scope="module",
    params=[
        ("nixl", "cpu"),
        ("ucx", "cpu"),
        ("cuda_ipc", "cpu"),  # no GPU: every room takes the NIXL path it falls back to
        pytest.param(("nixl", "cuda"), marks=_GPU, id="nixl-cuda"),
        pytest.param(("ucx", "cuda"), marks=_GPU + _UCXX, id="ucx-cuda"),
        pytest.param(("cuda_ipc", "cuda"), marks=_GPU, id="cuda_ipc-cuda"),
    ],
    ids=lambda p: "-".join(p) if isinstance(p, tuple) else p,
)
def cluster(request):
    backend, device = request.param
    specs = [WorkerSpec(backend, name, LAYOUT.to_dict(), WAIT_S, device) for name in ("P", "D1", "D2")]
    p, d1, d2 = procs = start_agents(specs)
    try:
        p_info, d1_info, d2_info = (proc.call(Command.INFO) for proc in procs)
        d1_name, d2_name = p.call(Command.ADD_PEER, info=d1_info), p.call(Command.ADD_PEER, info=d2_info)
        p_name = d1.call(Command.ADD_PEER, info=p_info)
        assert d2.call(Command.ADD_PEER, info=p_info) == p_name
        yield Cluster(p, d1, d2, p_name, d1_name, d2_name, d1_info, backend, device)
    finally:
        for proc in procs:
            proc.close()


@pytest.fixture(autouse=True)
def fresh_buffers(cluster):
    cluster.p.call(Command.FILL)
    cluster.d1.call(Command.FILL, sentinel=SENTINEL)
    cluster.d2.call(Command.FILL, sentinel=SENTINEL)
    yield
    _assert_no_leaks(cluster)


def _room() -> int:
    return random.getrandbits(63)


def _expected(dst_before: np.ndarray, src: np.ndarray, src_pages: list[int], dst_pages: list[int]) -> np.ndarray:
    want = dst_before.copy()
    want[:, dst_pages] = src[:, src_pages]
    return want


def _assert_no_leaks(c: Cluster) -> None:
    stats: list[dict] = []

    def clean() -> bool:
        stats[:] = [proc.call(Command.STATS) for proc in (c.p, c.d1, c.d2)]
        return all(s["num_rooms"] == 0 and s["num_inflight_requests"] == 0 for s in stats)

    wait_until(clean, 5.0, 0.05, lambda: f"rooms or requests left over: {stats}")


def _transfer(c: Cluster, d: AgentProcess, d_name: str, src_pages, dst_pages, chunks=None, receiver_first=True):
    """One room; ``chunks`` is a list of (start, end, is_last) slices of the page lists."""
    room = _room()
    chunks = chunks or [(0, len(src_pages), True)]
    if receiver_first:
        d.call(Command.OPEN_RECEIVER, room=room, peer=c.p_name)
    c.p.call(Command.OPEN_SENDER, room=room, peer=d_name, dst_pages=dst_pages)
    for start, end, is_last in chunks:
        c.p.call(Command.SEND, room=room, src_pages=src_pages[start:end], dst_start=start, is_last=is_last)
    sent = c.p.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S)[room][0]
    if not receiver_first:
        d.call(Command.OPEN_RECEIVER, room=room, peer=c.p_name)
    got = d.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S)[room][0]
    return room, sent, got


def _check_pages(c: Cluster, d: AgentProcess, src_pages, dst_pages) -> None:
    src = c.p.call(Command.READ)
    dst = d.call(Command.READ)
    before = np.full_like(dst, SENTINEL)
    np.testing.assert_array_equal(dst, _expected(before, src, src_pages, dst_pages))


def test_contiguous_pages_one_descriptor_per_region(cluster):
    src, dst = list(range(0, 6)), list(range(8, 14))
    room, sent, got = _transfer(cluster, cluster.d1, cluster.d1_name, src, dst)
    assert (sent, got) == (SUCCESS, SUCCESS)
    assert cluster.p.call(Command.COUNTERS, room=room) == (LAYOUT.num_regions, 6 * LAYOUT.page_bytes * LAYOUT.num_regions)
    _check_pages(cluster, cluster.d1, src, dst)


@pytest.mark.parametrize("src, dst", [([0, 1, 5], [3, 4, 10]), ([0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11])],
                         ids=["runs", "scattered"])
def test_cuda_ipc_copies_exactly_when_the_pool_is_on_the_shared_gpu(cluster, src, dst):
    if cluster.backend != "cuda_ipc":
        pytest.skip("cuda_ipc only")
    room, sent, got = _transfer(cluster, cluster.d2, cluster.d2_name, src, dst)
    assert (sent, got) == (SUCCESS, SUCCESS)
    on_gpu = cluster.device == "cuda"
    assert cluster.p.call(Command.IPC_COPIES, room=room) == (1 if on_gpu else 0)
    # ... and the chunk's notice went through the notice ring, not NIXL
    assert cluster.p.call(Command.RING_NOTICES, room=room) == (1 if on_gpu else 0)
    _check_pages(cluster, cluster.d2, src, dst)


def test_a_removed_peer_is_let_go_and_can_be_loaded_again(cluster):
    peers = cluster.p.call(Command.STATS)["num_peers"]
    cluster.p.call(Command.REMOVE_PEER, peer=cluster.d1_name)
    assert cluster.p.call(Command.STATS)["num_peers"] == peers - 1
    with pytest.raises(KeyError):
        cluster.p.call(Command.OPEN_SENDER, room=_room(), peer=cluster.d1_name, dst_pages=[0])
    assert cluster.p.call(Command.ADD_PEER, info=cluster.d1_info) == cluster.d1_name
    src, dst = [2, 3], [6, 7]
    _, sent, got = _transfer(cluster, cluster.d1, cluster.d1_name, src, dst)
    assert (sent, got) == (SUCCESS, SUCCESS)
    _check_pages(cluster, cluster.d1, src, dst)


def test_scattered_pages_merge_runs(cluster):
    src, dst = [1, 2, 3, 7], [4, 5, 6, 9]
    room, sent, got = _transfer(cluster, cluster.d1, cluster.d1_name, src, dst)
    assert (sent, got) == (SUCCESS, SUCCESS)
    assert cluster.p.call(Command.COUNTERS, room=room)[0] == 2 * LAYOUT.num_regions
    _check_pages(cluster, cluster.d1, src, dst)


@pytest.mark.parametrize("empty_last", [False, True])
def test_multi_chunk_room(cluster, empty_last):
    src = list(range(10))
    dst = [15, 13, 11, 9, 7, 5, 3, 1, 0, 2]  # nothing merges
    chunks = [(0, 4, False), (4, 8, False), (8, 10, not empty_last)]
    if empty_last:
        chunks.append((10, 10, True))
    room, sent, got = _transfer(cluster, cluster.d2, cluster.d2_name, src, dst, chunks)
    assert (sent, got) == (SUCCESS, SUCCESS)
    assert cluster.p.call(Command.COUNTERS, room=room)[0] == 10 * LAYOUT.num_regions
    _check_pages(cluster, cluster.d2, src, dst)


def test_receiver_not_done_before_last_chunk(cluster):
    room = _room()
    cluster.d1.call(Command.OPEN_RECEIVER, room=room, peer=cluster.p_name)
    cluster.p.call(Command.OPEN_SENDER, room=room, peer=cluster.d1_name, dst_pages=[0, 1])
    cluster.p.call(Command.SEND, room=room, src_pages=[5], dst_start=0, is_last=False)
    assert cluster.p.call(Command.WAIT, rooms=[room], timeout_s=0.5)[room][0] == int(RoomState.TRANSFERRING)
    assert cluster.d1.call(Command.WAIT, rooms=[room], timeout_s=0.5)[room][0] in (
        int(RoomState.WAITING_FOR_INPUT), int(RoomState.TRANSFERRING))
    cluster.p.call(Command.SEND, room=room, src_pages=[6], dst_start=1, is_last=True)
    assert cluster.p.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S)[room][0] == SUCCESS
    assert cluster.d1.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S)[room][0] == SUCCESS
    _check_pages(cluster, cluster.d1, [5, 6], [0, 1])


def test_many_rooms_in_flight_to_two_decode_agents(cluster):
    """32 rooms at once, one page each, 16 to each decode agent; half of the
    receivers are created only after their room finished on P."""
    rng = random.Random(7)
    plan = []
    for d, name in ((cluster.d1, cluster.d1_name), (cluster.d2, cluster.d2_name)):
        for dst_page, src_page in enumerate(rng.sample(range(16), 16)):
            plan.append((_room(), d, name, src_page, dst_page))
    for room, d, *_ in plan[::2]:
        d.call(Command.OPEN_RECEIVER, room=room, peer=cluster.p_name)
    for room, _, name, src_page, dst_page in plan:
        cluster.p.call(Command.OPEN_SENDER, room=room, peer=name, dst_pages=[dst_page])
        cluster.p.call(Command.SEND, room=room, src_pages=[src_page], dst_start=0, is_last=True)
    p_states = cluster.p.call(Command.WAIT, rooms=[r for r, *_ in plan], timeout_s=WAIT_S)
    assert {s for s, _ in p_states.values()} == {SUCCESS}
    for room, d, _, _, _ in plan[1::2]:
        d.call(Command.OPEN_RECEIVER, room=room, peer=cluster.p_name)
    for d in (cluster.d1, cluster.d2):
        rooms = [r for r, dd, *_ in plan if dd is d]
        assert {s for s, _ in d.call(Command.WAIT, rooms=rooms, timeout_s=WAIT_S).values()} == {SUCCESS}
        pairs = [(s, dp) for _, dd, _, s, dp in plan if dd is d]
        _check_pages(cluster, d, [s for s, _ in pairs], [dp for _, dp in pairs])


def test_prefill_abort_midway_fails_only_that_room(cluster):
    doomed, healthy = _room(), _room()
    for room in (doomed, healthy):
        cluster.d1.call(Command.OPEN_RECEIVER, room=room, peer=cluster.p_name)
    cluster.p.call(Command.OPEN_SENDER, room=doomed, peer=cluster.d1_name, dst_pages=[0, 1, 2, 3])
    cluster.p.call(Command.OPEN_SENDER, room=healthy, peer=cluster.d1_name, dst_pages=[8, 9])
    cluster.p.call(Command.SEND, room=doomed, src_pages=[0, 1], dst_start=0, is_last=False)
    cluster.p.call(Command.SEND, room=healthy, src_pages=[4], dst_start=0, is_last=False)
    cluster.p.call(Command.ABORT, room=doomed)
    cluster.p.call(Command.SEND, room=healthy, src_pages=[5], dst_start=1, is_last=True)
    p_states = cluster.p.call(Command.WAIT, rooms=[doomed, healthy], timeout_s=WAIT_S)
    assert (p_states[doomed][0], p_states[healthy][0]) == (FAILED, SUCCESS)
    start = time.monotonic()
    d_states = cluster.d1.call(Command.WAIT, rooms=[doomed, healthy], timeout_s=WAIT_S)
    assert (d_states[doomed][0], d_states[healthy][0]) == (FAILED, SUCCESS)
    assert d_states[doomed][1] - start < WAIT_S / 2, "the abort notice, not the timeout, failed the room"
    np.testing.assert_array_equal(cluster.d1.call(Command.READ)[:, [8, 9]], cluster.p.call(Command.READ)[:, [4, 5]])


def test_decode_abort_reaches_the_sender(cluster):
    room = _room()
    cluster.d2.call(Command.OPEN_RECEIVER, room=room, peer=cluster.p_name)
    cluster.p.call(Command.OPEN_SENDER, room=room, peer=cluster.d2_name, dst_pages=[0, 1])
    cluster.p.call(Command.SEND, room=room, src_pages=[3], dst_start=0, is_last=False)
    cluster.d2.call(Command.ABORT, room=room)
    assert cluster.d2.call(Command.WAIT, rooms=[room], timeout_s=1)[room][0] == FAILED
    start = time.monotonic()
    state, done_at = cluster.p.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S)[room]
    assert state == FAILED and done_at - start < WAIT_S / 2


def test_data_for_an_aborted_room_is_dropped_without_leaks(cluster):
    """D gave the room up before P sent anything: P fails fast or finishes,
    D buffers nothing, and the next room on the same pair still works."""
    aborted = _room()
    cluster.d1.call(Command.OPEN_RECEIVER, room=aborted, peer=cluster.p_name)
    cluster.d1.call(Command.ABORT, room=aborted)
    cluster.p.call(Command.OPEN_SENDER, room=aborted, peer=cluster.d1_name, dst_pages=[0])
    cluster.p.call(Command.SEND, room=aborted, src_pages=[0], dst_start=0, is_last=True)
    assert cluster.p.call(Command.WAIT, rooms=[aborted], timeout_s=WAIT_S)[aborted][0] in (SUCCESS, FAILED)
    _, sent, got = _transfer(cluster, cluster.d1, cluster.d1_name, [2], [3])
    assert (sent, got) == (SUCCESS, SUCCESS)
    assert cluster.d1.call(Command.STATS)["num_buffered_rooms"] == 0


def test_receiver_times_out_when_nothing_arrives(cluster):
    room = _room()
    cluster.d1.call(Command.OPEN_RECEIVER, room=room, peer=cluster.p_name, timeout_s=0.3)
    state, _ = cluster.d1.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S)[room]
    assert state == FAILED


def test_sender_times_out_without_last_chunk(cluster):
    room = _room()
    cluster.d2.call(Command.OPEN_RECEIVER, room=room, peer=cluster.p_name)
    cluster.p.call(Command.OPEN_SENDER, room=room, peer=cluster.d2_name, dst_pages=[0, 1], timeout_s=0.3)
    cluster.p.call(Command.SEND, room=room, src_pages=[0], dst_start=0, is_last=False)
    assert cluster.p.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S)[room][0] == FAILED
    # the sender's timeout aborts the room on D as well
    assert cluster.d2.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S)[room][0] == FAILED


def test_layout_mismatch_refuses_pairing(cluster):
    info = decode_as(cluster.d1_info, AgentInfo)
    wrong = replace(LAYOUT, page_size=16, dtype="bfloat16")
    forged = encode(replace(info, name=info.name + "-x", kv_layout=wrong))
    with pytest.raises(LayoutMismatchError) as exc:
        cluster.p.call(Command.ADD_PEER, info=forged)
    text = str(exc.value)
    assert "page_size" in text and "=8 vs" in text and "=16" in text
    assert "float32" in text and "bfloat16" in text


def test_add_peer_is_idempotent(cluster):
    assert cluster.p.call(Command.ADD_PEER, info=cluster.d1_info) == cluster.d1_name


def test_bad_destination_range_is_rejected(cluster):
    room = _room()
    cluster.p.call(Command.OPEN_SENDER, room=room, peer=cluster.d1_name, dst_pages=[0])
    with pytest.raises(ValueError):
        cluster.p.call(Command.SEND, room=room, src_pages=[0, 1], dst_start=0, is_last=True)
    cluster.p.call(Command.ABORT, room=room)


QUIESCE_S = 10.0  # above QuiescenceClock.GRACE_MAX_S


def test_success_leaves_both_sides_quiescent(cluster):
    room, sent, got = _transfer(cluster, cluster.d1, cluster.d1_name, [0, 1, 2], [5, 6, 7])
    assert (sent, got) == (SUCCESS, SUCCESS)
    assert cluster.p.call(Command.WAIT_QUIESCENT, room=room, timeout_s=QUIESCE_S) is not None
    assert cluster.d1.call(Command.WAIT_QUIESCENT, room=room, timeout_s=QUIESCE_S) is not None


def test_open_receiver_is_not_quiescent(cluster):
    room = _room()
    cluster.d2.call(Command.OPEN_RECEIVER, room=room, peer=cluster.p_name)
    assert cluster.d2.call(Command.QUIESCENT, room=room) is False
    cluster.d2.call(Command.ABORT, room=room)
    assert cluster.d2.call(Command.WAIT_QUIESCENT, room=room, timeout_s=QUIESCE_S) is not None


@pytest.mark.parametrize("aborter", ["prefill", "decode"])
def test_abort_mid_transfer_quiesces_and_nothing_lands_after(cluster, aborter):
    """Once both sides are quiescent the destination pages stay as they are:
    each page holds either the sentinel or its whole source page."""
    room = _room()
    src, dst = list(range(15, 3, -1)), list(range(12))  # reversed: one descriptor per page
    cluster.d1.call(Command.OPEN_RECEIVER, room=room, peer=cluster.p_name)
    cluster.p.call(Command.OPEN_SENDER, room=room, peer=cluster.d1_name, dst_pages=dst)
    cluster.p.call(Command.SEND, room=room, src_pages=src[:6], dst_start=0, is_last=False)
    cluster.p.call(Command.SEND, room=room, src_pages=src[6:10], dst_start=6, is_last=False)
    (cluster.p if aborter == "prefill" else cluster.d1).call(Command.ABORT, room=room)
    assert cluster.p.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S)[room][0] == FAILED
    assert cluster.d1.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S)[room][0] == FAILED
    assert cluster.p.call(Command.WAIT_QUIESCENT, room=room, timeout_s=QUIESCE_S) is not None
    assert cluster.d1.call(Command.WAIT_QUIESCENT, room=room, timeout_s=QUIESCE_S) is not None
    at_quiescence = cluster.d1.call(Command.READ)
    time.sleep(0.3)  # a late write has no event to wait for: give one time to land, were it still coming
    after = cluster.d1.call(Command.READ)
    np.testing.assert_array_equal(after, at_quiescence)
    source = cluster.p.call(Command.READ)
    np.testing.assert_array_equal(after[:, 12:], SENTINEL)
    for s, d in zip(src, dst, strict=True):
        page = after[:, d]
        assert (page == SENTINEL).all() or np.array_equal(page, source[:, s]), f"page {d} is torn"


def test_poll_without_progress_reads_only_gathered_state(cluster):
    room = _room()
    cluster.d2.call(Command.OPEN_RECEIVER, room=room, peer=cluster.p_name)
    cluster.p.call(Command.OPEN_SENDER, room=room, peer=cluster.d2_name, dst_pages=[2, 3])
    cluster.p.call(Command.SEND, room=room, src_pages=[9, 10], dst_start=0, is_last=True)
    assert cluster.p.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S, progress=False)[room][0] == SUCCESS
    time.sleep(0.2)  # time for the news to reach D, which must still not see it (nothing to wait on)
    # D's agent has not run progress() since: the news waits there, unseen.
    assert cluster.d2.call(Command.POLL, room=room, progress=False) == int(RoomState.WAITING_FOR_INPUT)
    assert cluster.d2.call(Command.WAIT, rooms=[room], timeout_s=WAIT_S, progress=False)[room][0] == SUCCESS
    _check_pages(cluster, cluster.d2, [9, 10], [2, 3])
