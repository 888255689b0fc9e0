"""The PD control channel: typed messages over TCP, apart from the KV data path.

Frames are a 4-byte big-endian length followed by one ``common.codec``
message. Server and client each run one background thread with a selector;
the engine thread only touches thread-safe queues, so ``send`` and
``recv_nowait`` never block. A dead peer shows up as a closed connection
(``ControlClosedError`` on send, ``closed_connections()`` on the server), never
as a hang.

Delivery is in order per connection and at most once: the client reconnects
(bounded retries) after a drop and resends the frame it was in the middle of,
but frames the old connection had fully written may be lost with it; rooms
that depended on them time out. With ``final_when_refused``, a refused
connection ends the client at once (``refused``): nothing listens at the
address any more, the peer is gone.

A server may be given a ``greeting``: the first frame of every connection it
accepts (the PD roles send the instance's epoch).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import selectors
import socket
import struct
import threading
import time
from collections import deque
from typing import Any

from pdserve.common.codec import CodecError, decode, encode

logger = logging.getLogger("pdserve.transfer.control")

_HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 64 << 20
_READ_BYTES = 1 << 16


class ControlClosedError(ConnectionError):
    """The connection (or the whole channel) is gone."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"control address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


class _Framed:
    """One non-blocking socket: whole frames in, queued frames out."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._rbuf = bytearray()
        self._frames: deque[bytes] = deque()
        self._offset = 0  # bytes of the head frame already written

    def queue(self, frame: bytes) -> None:
        self._frames.append(frame)

    @property
    def wants_write(self) -> bool:
        return bool(self._frames)

    def read(self) -> list[bytes]:
        """Frames completed by this read; raises ConnectionError on EOF or a bad frame."""
        data = self.sock.recv(_READ_BYTES)
        if not data:
            raise ConnectionError("peer closed the connection")
        self._rbuf += data
        frames = []
        while len(self._rbuf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._rbuf)
            if size > MAX_FRAME_BYTES:
                raise ConnectionError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
            if len(self._rbuf) < _HEADER.size + size:
                break
            frames.append(bytes(self._rbuf[_HEADER.size : _HEADER.size + size]))
            del self._rbuf[: _HEADER.size + size]
        return frames

    def write(self) -> None:
        while self._frames:
            head = self._frames[0]
            sent = self.sock.send(memoryview(head)[self._offset :])
            self._offset += sent
            if self._offset < len(head):
                return  # socket buffer full; the selector calls again
            self._frames.popleft()
            self._offset = 0

    def take_unsent(self) -> deque[bytes]:
        """Frames not fully written; a partial head frame is resent whole."""
        self._offset = 0
        frames, self._frames = self._frames, deque()
        return frames

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _frame(msg: Any) -> bytes:
    body = encode(msg)
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"message of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


def _decode_frames(frames: list[bytes]) -> list[Any]:
    msgs = []
    for frame in frames:
        try:
            msg = decode(frame)
        except CodecError as exc:
            raise ConnectionError(f"undecodable control frame: {exc}") from exc
        if not dataclasses.is_dataclass(msg):
            raise ConnectionError(f"control frame is not a typed message: {type(msg).__name__}")
        msgs.append(msg)
    return msgs


class _Loop:
    """A selector thread that can be woken when the engine queues output."""

    def __init__(self, name: str) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending, or shutting down

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._tick()
                for key, events in self._sel.select(timeout=0.5):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        self._on_event(key.data, events)
        except Exception:  # never die silently: the engine sees closed state
            logger.exception("control channel thread failed")
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _watch(self, conn: _Framed, data: Any) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wants_write else 0)
        try:
            self._sel.modify(conn.sock, events, data)
        except KeyError:
            self._sel.register(conn.sock, events, data)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _shutdown(self) -> None:
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _tick(self) -> None:
        """Called every loop turn on the thread: move queued output to sockets."""

    def _on_event(self, data: Any, events: int) -> None:
        raise NotImplementedError


class ControlServer(_Loop):
    """Accepts any number of clients; each connection gets an integer id."""

    def __init__(self, host: str, port: int, greeting: Any = None) -> None:
        super().__init__("pdserve-control-server")
        self._greeting = None if greeting is None else _frame(greeting)
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.setblocking(False)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._conns: dict[int, _Framed] = {}  # thread-owned
        self._alive: set[int] = set()
        self._lock = threading.Lock()
        self._next_id = 0
        self._inbox: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()
        self._closed_ids: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread.start()

    def recv_nowait(self) -> list[tuple[int, Any]]:
        return _drain(self._inbox)

    def closed_connections(self) -> list[int]:
        """Ids of connections that ended since the last call."""
        return _drain(self._closed_ids)

    def send(self, conn_id: int, msg: Any) -> None:
        with self._lock:
            if conn_id not in self._alive:
                raise ControlClosedError(f"control connection {conn_id} is closed")
        self._outbox.put((conn_id, _frame(msg)))
        self.wake()

    def close(self) -> None:
        self.stop()

    def _tick(self) -> None:
        for conn_id, frame in _drain(self._outbox):
            conn = self._conns.get(conn_id)
            if conn is not None:
                conn.queue(frame)
                self._watch(conn, conn_id)

    def _on_event(self, data: Any, events: int) -> None:
        if data == "listen":
            self._accept()
            return
        conn = self._conns.get(data)
        if conn is None:
            return
        try:
            if events & selectors.EVENT_READ:
                for msg in _decode_frames(conn.read()):
                    self._inbox.put((data, msg))
            if events & selectors.EVENT_WRITE:
                conn.write()
            self._watch(conn, data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            logger.info("control connection %d closed: %s", data, exc)
            self._drop(data)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn_id, self._next_id = self._next_id, self._next_id + 1
        self._conns[conn_id] = _Framed(sock)
        if self._greeting is not None:
            self._conns[conn_id].queue(self._greeting)
        with self._lock:
            self._alive.add(conn_id)
        self._watch(self._conns[conn_id], conn_id)

    def _drop(self, conn_id: int) -> None:
        conn = self._conns.pop(conn_id)
        self._sel.unregister(conn.sock)
        conn.close()
        with self._lock:
            self._alive.discard(conn_id)
        self._closed_ids.put(conn_id)

    def _shutdown(self) -> None:
        for conn_id in list(self._conns):
            self._drop(conn_id)
        self._listener.close()
        super()._shutdown()


class ControlClient(_Loop):
    """One connection to a ControlServer, re-established after a drop."""

    def __init__(self, address: str, connect_timeout_s: float = 5.0, max_retries: int = 5,
                 retry_interval_s: float = 0.2, final_when_refused: bool = False) -> None:
        super().__init__("pdserve-control-client")
        self.address = address
        self._target = split_address(address)
        self._connect_timeout_s = connect_timeout_s
        self._max_retries = max_retries
        self._retry_interval_s = retry_interval_s
        self._final_when_refused = final_when_refused
        self._conn: _Framed | None = None
        self._pending: deque[bytes] = deque()  # frames waiting for a connection
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._failures = 0
        self._next_attempt = 0.0
        self.error: str | None = None
        self.refused = False  # closed because nothing listens at the address
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self.error is not None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def send(self, msg: Any) -> None:
        if self.error is not None:
            raise ControlClosedError(f"control channel to {self.address} is closed: {self.error}")
        self._outbox.put(_frame(msg))
        self.wake()

    def recv_nowait(self) -> list[Any]:
        return _drain(self._inbox)

    def close(self) -> None:
        if self.error is None:
            self.error = "closed"
        self.stop()

    def _tick(self) -> None:
        self._pending.extend(_drain(self._outbox))
        if self._conn is None and self.error is None and time.monotonic() >= self._next_attempt:
            self._connect()
        if self._conn is not None and self._pending:
            while self._pending:
                self._conn.queue(self._pending.popleft())
            self._watch(self._conn, "conn")

    def _connect(self) -> None:
        try:
            sock = socket.create_connection(self._target, timeout=self._connect_timeout_s)
        except ConnectionRefusedError as exc:
            if not self._final_when_refused:
                self._retry_later(exc)
                return
            self.refused = True
            self.error = f"{self.address} refused the connection: {exc}"
            self._stopping.set()
            return
        except OSError as exc:
            self._retry_later(exc)
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = _Framed(sock)
        self._failures = 0
        self._watch(self._conn, "conn")

    def _retry_later(self, exc: OSError) -> None:
        self._failures += 1
        if self._failures > self._max_retries:
            self.error = f"cannot connect to {self.address}: {exc}"
            self._stopping.set()
        self._next_attempt = time.monotonic() + self._retry_interval_s * self._failures

    def _on_event(self, data: Any, events: int) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            if events & selectors.EVENT_READ:
                for msg in _decode_frames(conn.read()):
                    self._inbox.put(msg)
            if events & selectors.EVENT_WRITE:
                conn.write()
            self._watch(conn, "conn")
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            logger.info("control connection to %s lost: %s", self.address, exc)
            self._sel.unregister(conn.sock)
            self._pending.extendleft(reversed(conn.take_unsent()))
            conn.close()
            self._conn = None

    def _shutdown(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        super()._shutdown()


def _drain(q: queue.SimpleQueue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
