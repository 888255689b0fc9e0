"""Chunk notices that the prefill GPU writes straight into the decode host's memory.

With CUDA IPC the bytes of a chunk land in the decode pool within tens of
microseconds, but a notice sent by the prefill host can only leave once that
host has seen the copy's event complete, and a busy engine loop looks late.
A notice ring takes the prefill host out of that path: the copy stream itself
writes the chunk's record into a shared-memory segment right after the copy,
and the decode agent reads new records on every poll.

1. The prefill agent creates one ring per decode peer it maps (a file under
   ``/dev/shm``), registers it with CUDA (``cudaHostRegister``) so its copy
   stream can write there, and offers it to the peer in a NIXL notice.
2. Per chunk, a one-program kernel on the copy stream, ordered after the
   page copy, stores the record into the ring slot through the segment's
   device mapping (``kernels/ring_record``).
3. The decode agent opens the ring when the offer arrives (and unlinks its
   name: from then on the segment lives exactly as long as the two mappings),
   reads records in order and routes each as the chunk's notice.
4. A record is ``(seq + 1, room, chunk_index * 2 + is_last, check)``; a reader
   takes slot ``seq % N`` only when its sequence number and check word match,
   so a record still being written is read on a later poll, never half.
5. The reader publishes how far it has read; a writer whose ring is full, or
   not registered, returns False and the caller sends the notice over NIXL.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import tempfile

import numpy as np
import torch

NUM_RECORDS = 4096
_WORDS = 4  # int64 words per record
_HEADER_WORDS = 8  # word 0: how many records the reader has taken
_MAGIC = 0x5044_5345_5256_4531  # mixed into the check word
_HOST_REGISTER_MAPPED = 2  # cudaHostRegisterMapped: the segment gets a device address
_MASK = (1 << 64) - 1
_PREFIX = "pdserve-ring-"


def ring_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _signed(value: int) -> int:
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


def encode_record(seq: int, room: int, chunk_index: int, is_last: bool) -> list[int]:
    code = chunk_index * 2 + int(is_last)
    return [_signed(seq + 1), _signed(room), code, _signed((seq + 1) ^ room ^ code ^ _MAGIC)]


def _segment_bytes(num_records: int) -> int:
    """Whole pages: what cudaHostRegister pins."""
    return -(-(_HEADER_WORDS + num_records * _WORDS) * 8 // mmap.PAGESIZE) * mmap.PAGESIZE


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def valid_ring_path(path: str) -> bool:
    """Only our own segments under the ring directory may be opened from a notice."""
    head, tail = os.path.split(path)
    return head == ring_dir() and tail.startswith(_PREFIX) and _safe(tail) == tail


class _Segment:
    """A mapped ring file: header + records as int64 words."""

    def __init__(self, path: str, num_records: int, create: bool) -> None:
        self.path, self.num_records = path, num_records
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, _segment_bytes(num_records))
            elif os.fstat(fd).st_size != _segment_bytes(num_records):
                raise ValueError(f"ring {path} has the wrong size")
            self.mm = mmap.mmap(fd, _segment_bytes(num_records))
        finally:
            os.close(fd)
        self.words = np.frombuffer(self.mm, dtype=np.int64)
        self.records = self.words[_HEADER_WORDS : _HEADER_WORDS + num_records * _WORDS].reshape(num_records, _WORDS)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.words = self.records = None  # drop the views before the mapping
        try:
            self.mm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass


class RingWriter:
    """The prefill side of one peer's ring.

    ``post`` enqueues a record on a CUDA stream (after the work already queued
    there); ``post_host`` writes it at once from this host, the same record in
    the same order (what a reader's tests drive it with: the backend only maps
    GPU pools, so its rings are always written by a stream)."""

    def __init__(self, writer_name: str, reader_name: str, num_records: int = NUM_RECORDS,
                 device=None) -> None:
        name = f"{_PREFIX}{_safe(writer_name)}-{_safe(reader_name)}-{secrets.token_hex(4)}"
        self._seg = _Segment(os.path.join(ring_dir(), name), num_records, create=True)
        self._next = 0
        self._registered = False
        if device is not None:
            self._register(device)

    @property
    def path(self) -> str:
        return self._seg.path

    @property
    def num_records(self) -> int:
        return self._seg.num_records

    @property
    def on_gpu(self) -> bool:
        return self._registered

    def _register(self, device) -> None:
        from pdserve.transfer.kernels.ring_record import (  # Triton: GPU only
            device_view,
            store_record,
        )

        host = torch.frombuffer(self._seg.mm, dtype=torch.int64)
        self._base_ptr = host.data_ptr()
        rc = torch.cuda.cudart().cudaHostRegister(self._base_ptr, host.numel() * 8, _HOST_REGISTER_MAPPED)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister of {self.path} failed ({rc})")
        self._registered = True
        # The segment's device mapping: a kernel on the copy stream stores records there.
        view = device_view(self._base_ptr, host.numel() * 2, torch.device(device))
        if view is None:
            self.close()
            raise RuntimeError(f"no device address for {self.path}")
        self._device_records = view[2 * _HEADER_WORDS : 2 * (_HEADER_WORDS + self.num_records * _WORDS)].view(
            self.num_records, 2 * _WORDS)
        self._store_record = store_record

    def _claim(self) -> int | None:
        """The next sequence number, or None while the reader is a full ring behind."""
        if self._next - int(self._seg.words[0]) >= self.num_records:
            return None
        seq, self._next = self._next, self._next + 1
        return seq

    def post(self, room: int, chunk_index: int, is_last: bool, stream) -> bool:
        """Queue the record on ``stream``; False if it cannot go through the ring."""
        if not self._registered:
            return False
        seq = self._claim()
        if seq is None:
            return False
        record = encode_record(seq, room, chunk_index, is_last)
        self._store_record(self._device_records[seq % self.num_records], record, stream)
        return True

    def post_host(self, room: int, chunk_index: int, is_last: bool) -> bool:
        seq = self._claim()
        if seq is None:
            return False
        record = encode_record(seq, room, chunk_index, is_last)
        row = self._seg.records[seq % self.num_records]
        row[1:] = record[1:]
        row[0] = record[0]  # the sequence word last: a reader sees the record whole
        return True

    def close(self) -> None:
        """Call once nothing queued on the stream can still write here."""
        if self._registered:
            self._device_records = None
            torch.cuda.cudart().cudaHostUnregister(self._base_ptr)
            self._registered = False
        self._seg.unlink()
        self._seg.close()


class RingReader:
    """The decode side of one peer's ring: records in order, each exactly once."""

    def __init__(self, path: str, num_records: int) -> None:
        if not valid_ring_path(path):
            raise ValueError(f"not a notice ring path: {path!r}")
        self._seg = _Segment(path, num_records, create=False)
        self._seg.unlink()  # both sides hold the mapping now; the name is not needed
        self._next = int(self._seg.words[0])

    def poll(self) -> list[tuple[int, int, bool]]:
        """New ``(room, chunk_index, is_last)`` records since the last poll."""
        out = []
        records, n = self._seg.records, self._seg.num_records
        while True:
            row = records[self._next % n].copy()
            seq_word, room, code, check = (int(v) for v in row)
            if seq_word != _signed(self._next + 1) or check != _signed(seq_word ^ room ^ code ^ _MAGIC):
                break
            out.append((room & _MASK if room < 0 else room, code >> 1, bool(code & 1)))
            self._next += 1
        if out:
            self._seg.words[0] = self._next
        return out

    def close(self) -> None:
        self._seg.close()
