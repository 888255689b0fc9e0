"""TCP ports on 127.0.0.1: free ones, busy ones, refusing ones, and sockets
the other side closes."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager

HOST = "127.0.0.1"


def free_port() -> int:
    """A port the OS reports free right now (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    """Where the OS picks local ports for outgoing connections and for port 0."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive ports that are all free right now
    (for a launcher that numbers its instances from a base port).

    The block lies below the ephemeral range when there is room, so that a
    connection some other test opens meanwhile cannot take one of its ports."""
    low, high = 20000, _ephemeral_range()[0]
    if high - low < 100 * count:
        low, high = 20000, 60000
    for _ in range(100):
        first = random.randrange(low, high - count)
        socks: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((HOST, port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports")


@contextmanager
def listening_port(port: int = 0) -> Iterator[int]:
    """``port`` (0: a free one) with something listening on it, for a ``with`` block:
    a port another server cannot take."""
    with socket.socket() as sock:
        sock.bind((HOST, port))
        sock.listen()
        yield sock.getsockname()[1]


@contextmanager
def refusing_port() -> Iterator[int]:
    """A port that is bound but not listening, for a ``with`` block: connections
    to it are refused, and no other server takes it meanwhile."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        yield sock.getsockname()[1]


def is_listening(port: int) -> bool:
    """Something accepts connections on ``port``."""
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


def closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """The other side closes ``sock`` within ``timeout_s`` (reading and dropping
    whatever it sends first: an error answer, say)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
