"""Tensor parallelism's pure parts: head ranges, shard plans, which rank pairs
move KV, their room ids, head-sliced descriptors, and the layout check."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from pdserve.common.kv_layout import KVLayout, kv_head_range
from pdserve.transfer.descriptors import build_descriptors
from pdserve.transfer.tp import pair_room, transfer_pairs

PAGE, DIM, LAYERS, HEADS = 2, 3, 2, 4


def _rank_layouts(tp: int, num_pages: int = 6, heads: int = HEADS) -> list[KVLayout]:
    out = []
    for rank in range(tp):
        start, count = kv_head_range(heads, tp, rank)
        out.append(KVLayout(num_layers=LAYERS, num_pages=num_pages, page_size=PAGE, num_kv_heads=count, head_dim=DIM,
                            dtype="float32", head_start=start, total_kv_heads=heads))
    return out


def test_head_ranges_split_and_replicate() -> None:
    assert [kv_head_range(4, 2, r) for r in range(2)] == [(0, 2), (2, 2)]
    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    with pytest.raises(ValueError, match="do not split"):
        kv_head_range(4, 3, 0)


def test_pairs_cover_every_destination_head_once() -> None:
    for p_tp, d_tp in itertools.product((1, 2, 4, 8), repeat=2):
        src, dst = _rank_layouts(p_tp), _rank_layouts(d_tp)
        pairs = transfer_pairs(src, dst)
        for j, d in enumerate(dst):
            heads = [h for i, jj in pairs if jj == j for h in range(src[i].head_start, src[i].head_start + src[i].num_kv_heads)
                     if d.head_start <= h < d.head_start + d.num_kv_heads]
            assert sorted(heads) == list(range(d.head_start, d.head_start + d.num_kv_heads)), (p_tp, d_tp, j)
    assert transfer_pairs(_rank_layouts(2), _rank_layouts(1)) == [(0, 0), (1, 0)]
    assert transfer_pairs(_rank_layouts(1), _rank_layouts(2)) == [(0, 0), (0, 1)]
    assert transfer_pairs(_rank_layouts(4), _rank_layouts(2)) == [(0, 0), (1, 0), (2, 1), (3, 1)]
    # Replicated source heads (8 ranks, 4 heads): replicas take turns.
    assert transfer_pairs(_rank_layouts(8), _rank_layouts(4)) == [(0, 0), (3, 1), (4, 2), (7, 3)]


def test_pair_rooms_are_distinct_and_keep_the_room_at_tp1() -> None:
    room = 123456789
    assert pair_room(room, 0, 0) == room
    ids = {pair_room(room, i, j) for i in range(8) for j in range(8)}
    assert len(ids) == 64 and all(0 <= r < 1 << 63 for r in ids)


@pytest.mark.parametrize("p_tp,d_tp", [(1, 2), (2, 1), (2, 4), (4, 2), (8, 2), (2, 8)])
def test_head_sliced_descriptors_move_exactly_the_shared_heads(p_tp: int, d_tp: int) -> None:
    """Every pair's descriptors, applied byte by byte, rebuild each D rank's
    shard of the full KV from the P ranks' shards, and nothing else."""
    full = torch.randn(LAYERS, 2, 6, PAGE, HEADS, DIM)
    src_pages, dst_pages = [1, 2, 4], [3, 0, 5]
    src, dst = _rank_layouts(p_tp), _rank_layouts(d_tp, num_pages=7)
    shards = [full[..., s.head_start : s.head_start + s.num_kv_heads, :].contiguous() for s in src]
    targets = [torch.full((LAYERS, 2, 7, PAGE, d.num_kv_heads, DIM), float("nan")) for d in dst]
    for i, j in transfer_pairs(src, dst):
        descs = build_descriptors(src_pages, dst_pages, src[i], dst[j])
        src_bytes = shards[i].view(torch.uint8).reshape(-1)
        dst_bytes = targets[j].view(torch.uint8).reshape(-1)
        for so, do, n in zip(descs.src_offsets.tolist(), descs.dst_offsets.tolist(), descs.lengths.tolist()):
            dst_bytes[do : do + n] = src_bytes[so : so + n]
    for d, target in zip(dst, targets):
        for s_page, d_page in zip(src_pages, dst_pages):
            want = full[:, :, s_page, :, d.head_start : d.head_start + d.num_kv_heads]
            assert torch.equal(target[:, :, d_page], want)
        untouched = [p for p in range(7) if p not in dst_pages]
        assert torch.isnan(target[:, :, untouched]).all()


def test_equal_heads_keep_whole_page_descriptors() -> None:
    a, b = _rank_layouts(2)[1], _rank_layouts(2, num_pages=9)[1]
    descs = build_descriptors([0, 1, 2], [4, 5, 6], a, b)
    assert len(descs) == LAYERS * 2  # one merged run per region, as at TP 1
    assert set(descs.lengths.tolist()) == {3 * a.page_bytes}


def test_layout_check_compares_model_heads_not_tp() -> None:
    p_rank, d_rank = _rank_layouts(2)[0], _rank_layouts(4)[3]
    assert p_rank.mismatch(d_rank) is None
    other_model = replace(_rank_layouts(1)[0], num_kv_heads=1, total_kv_heads=8)
    problem = p_rank.mismatch(other_model, "prefill", "decode")
    assert problem is not None and "num_kv_heads: prefill=4 vs decode=8" in problem
    wider = replace(_rank_layouts(1)[0], num_kv_heads=2, head_dim=DIM + 1)
    assert "head_dim: prefill=3 vs decode=4" in p_rank.mismatch(wider, "prefill", "decode")


def test_up_places_ranks_on_gpu_groups() -> None:
    from pdserve.launcher import Cluster, ClusterError, parse_args

    config, _ = parse_args(["--num-prefill", "1", "--num-decode", "2", "--gpu-ids", "0,1", "2", "4,6"])
    cluster = Cluster(config)
    argvs = [cluster._serve_argv(role, config.base_port + i, index)
             for i, (role, index) in enumerate([("prefill", 0), ("decode", 0), ("decode", 1)])]

    def flags(argv: list[str]) -> dict[str, str]:
        return {f: argv[argv.index(f) + 1] for f in ("--base-gpu-id", "--gpu-id-step", "--tp-size") if f in argv}

    assert [flags(a) for a in argvs] == [
        {"--base-gpu-id": "0", "--gpu-id-step": "1", "--tp-size": "2"},
        {"--base-gpu-id": "2"},
        {"--base-gpu-id": "4", "--gpu-id-step": "2", "--tp-size": "2"},
    ]
    cpu, _ = parse_args(["--num-prefill", "1", "--num-decode", "1", "--prefill-tp-size", "4", "--decode-tp-size", "2"])
    cpu_cluster = Cluster(cpu)
    assert flags(cpu_cluster._serve_argv("prefill", cpu.base_port, 0)) == {"--tp-size": "4"}
    assert flags(cpu_cluster._serve_argv("decode", cpu.base_port + 1, 0)) == {"--tp-size": "2"}
    uneven, _ = parse_args(["--num-prefill", "1", "--num-decode", "1", "--gpu-ids", "0,1,3"])
    with pytest.raises(ClusterError, match="evenly spaced"):
        Cluster(uneven)._serve_argv("prefill", uneven.base_port, 0)


class _Part:
    def __init__(self, state, quiet=True):
        self.state, self.failure, self.quiet = state, None, quiet

    def poll(self, progress=True):
        return self.state

    def quiescent(self):
        return self.quiet


class _Agent:
    def progress(self):
        pass


def test_rank_room_is_done_only_when_every_part_is() -> None:
    """A decode rank fed by two prefill ranks: one part landed is not the room landed."""
    from pdserve.transfer.base import RoomState
    from pdserve.transfer.tp import RankTransfer

    rank = RankTransfer.__new__(RankTransfer)
    rank.rank, rank.agent, rank.failed = 0, _Agent(), {}
    first, second = _Part(RoomState.SUCCESS), _Part(RoomState.WAITING_FOR_INPUT)
    rank.rooms = {7: [first, second]}
    assert rank.progress()[7][0] == RoomState.TRANSFERRING
    second.state = RoomState.SUCCESS
    assert rank.progress()[7] == [RoomState.SUCCESS, None, True]
    assert 7 not in rank.rooms  # reported over and quiet once, then forgotten
    failing = _Part(RoomState.FAILED)
    failing.failure = "peer aborted"
    rank.rooms = {8: [_Part(RoomState.SUCCESS), failing]}
    assert rank.progress()[8][:2] == [RoomState.FAILED, "peer aborted"]


def test_keep_alive_reaches_every_part_of_a_room_on_every_rank() -> None:
    """A prefill backlog's RoomsInPrefill restarts each rank's parts of the room,
    through the same call every rank runs (here the codec's round trip of it)."""
    from pdserve.common import codec
    from pdserve.transfer.base import RoomState
    from pdserve.transfer.tp import PartKeepAlive, RankTransfer, TPSender

    kept: list[str] = []

    class KeptPart(_Part):
        def __init__(self, name):
            super().__init__(RoomState.WAITING_FOR_INPUT)
            self.name = name

        def keep_alive(self):
            kept.append(self.name)

    rank = RankTransfer.__new__(RankTransfer)
    rank.rank, rank.agent, rank.failed = 0, _Agent(), {}
    rank.rooms = {7: [KeptPart("a"), KeptPart("b")], 8: [KeptPart("other")]}

    class Agent:
        def call(self, call):
            codec.decode(codec.encode(call)).run(rank)

    TPSender(Agent(), 7, "peer", [0, 1], 1.0, [3]).keep_alive()
    assert kept == ["a", "b"]
    done = TPSender(Agent(), 7, "peer", [0, 1], 1.0, [3])
    done._state = RoomState.SUCCESS
    done.keep_alive()  # a room that is over has no deadline left to restart
    assert kept == ["a", "b"] and isinstance(codec.decode(codec.encode(PartKeepAlive(room=7))), PartKeepAlive)
