"""The notice ring between a prefill agent's copy stream and a decode agent."""

from __future__ import annotations

import os

import pytest
import torch
from pdserve.transfer.notice_ring import (
    RingReader,
    RingWriter,
    encode_record,
    ring_dir,
    valid_ring_path,
)

ROOM = (1 << 63) - 5  # rooms are 63-bit: the largest still round-trips


@pytest.fixture
def pair():
    writer = RingWriter("P-1a2b", "D-3c4d", num_records=4)
    reader = RingReader(writer.path, 4)
    yield writer, reader
    reader.close()
    writer.close()


def test_records_arrive_in_order_exactly_once(pair):
    writer, reader = pair
    assert reader.poll() == []
    assert writer.post_host(ROOM, 0, False) and writer.post_host(7, 3, True)
    assert reader.poll() == [(ROOM, 0, False), (7, 3, True)]
    assert reader.poll() == []


def test_reader_owns_the_name_once_open():
    writer = RingWriter("P", "D", num_records=4)
    path = writer.path
    assert os.path.exists(path) and os.path.dirname(path) == ring_dir()
    reader = RingReader(path, 4)
    assert not os.path.exists(path)  # unlinked: the mappings alone keep it
    writer.post_host(1, 0, True)
    assert reader.poll() == [(1, 0, True)]
    reader.close()
    writer.close()  # a second unlink is harmless


def test_writer_unlinks_a_ring_nobody_opened():
    writer = RingWriter("P", "D", num_records=4)
    path = writer.path
    writer.close()
    assert not os.path.exists(path)


def test_a_full_ring_refuses_until_the_reader_catches_up(pair):
    writer, reader = pair
    assert all(writer.post_host(room, 0, True) for room in range(4))
    assert not writer.post_host(99, 0, True)  # the caller falls back to NIXL
    assert [r for r, _, _ in reader.poll()] == [0, 1, 2, 3]
    # wrapped around: slots 0.. are reused with new sequence numbers
    assert all(writer.post_host(room, 1, False) for room in range(10, 14))
    assert [r for r, _, _ in reader.poll()] == [10, 11, 12, 13]


def test_a_half_written_record_waits_for_a_later_poll(pair):
    writer, reader = pair
    seg = writer._seg
    record = encode_record(0, 42, 2, True)
    seg.records[0, 0] = record[0]  # the sequence word has landed, the rest has not
    assert reader.poll() == []
    seg.records[0, 1:] = record[1:]
    assert reader.poll() == [(42, 2, True)]


def test_a_stale_slot_is_not_read_again(pair):
    writer, reader = pair
    writer.post_host(5, 0, True)
    assert reader.poll() == [(5, 0, True)]
    seg = writer._seg
    seg.records[1] = seg.records[0]  # an old record copied where the next one goes
    assert reader.poll() == []


@pytest.mark.parametrize("path", ["/etc/passwd", os.path.join(ring_dir(), "other-file"),
                                  os.path.join(ring_dir(), "pdserve-ring-../x")])
def test_only_ring_paths_can_be_opened(path):
    assert not valid_ring_path(path)
    with pytest.raises(ValueError, match="not a notice ring"):
        RingReader(path, 4)


def test_a_ring_of_another_size_is_refused():
    writer = RingWriter("P", "D", num_records=4)
    with pytest.raises(ValueError, match="wrong size"):
        RingReader(writer.path, 4096)
    writer.close()


def test_post_needs_a_registered_ring(pair):
    writer, reader = pair
    assert not writer.on_gpu
    assert not writer.post(1, 0, True, stream=None)
    assert reader.poll() == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_stream_writes_the_record_after_the_work_before_it():
    from pdserve.transfer.kernels.ring_record import warm_up

    warm_up(torch.device("cuda"))  # as the agent does at start: no compile while the sleep below runs
    writer = RingWriter("P", "D", num_records=8, device=torch.device("cuda"))
    reader = RingReader(writer.path, 8)
    stream = torch.cuda.Stream()
    assert writer.on_gpu
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of the record
    assert writer.post(ROOM, 1, True, stream)
    assert reader.poll() == []  # the host did not write it; the stream has not got there
    stream.synchronize()
    assert reader.poll() == [(ROOM, 1, True)]
    for i in range(20):  # wraps the ring twice, each record read once
        assert writer.post(i, 0, False, stream)
        stream.synchronize()
        assert reader.poll() == [(i, 0, False)]
    reader.close()
    writer.close()
