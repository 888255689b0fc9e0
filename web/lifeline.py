"""A child process that does not outlive its parent, however the parent dies.

Two mechanisms, because each misses a case of the other:

- ``PR_SET_PDEATHSIG`` (Linux): the kernel sends the child a signal when the
  thread that forked it ends, SIGKILL of the whole parent included. It is set
  between fork and exec (``preexec_fn``) and survives the exec, but not a
  fork: the child's own children do not inherit it.
- A lifeline pipe: the parent keeps the write end, the child watches the read
  end in a thread; end of file means the parent is gone, since the kernel
  closes a dead process's descriptors. The watcher then kills the child's
  whole process group (a child of ``pdserve up`` leads its own), so whatever
  the child started goes too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from pdserve.common import env

logger = logging.getLogger("pdserve.lifeline")

_PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when this process (the forking thread) ends.

    The libc handle is looked up now, in the parent: between fork and exec the
    child should do as little as it can.
    """
    libc, parent_pid = _libc(), os.getpid()

    def preexec() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _watch(wait_for_eof: Callable[[], None], on_eof: Callable[[], None], name: str) -> threading.Thread:
    def run() -> None:
        try:
            wait_for_eof()
        except (EOFError, OSError):
            pass
        on_eof()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def _read_until_eof(fd: int) -> None:
    while os.read(fd, 4096):
        pass


def _kill_own_group() -> None:
    logger.error("the launcher is gone; exiting with everything this process started")
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(1)


def follow_launcher() -> threading.Thread | None:
    """Watch the lifeline ``pdserve up`` handed down (``$PDSERVE_LIFELINE_FD``), if any."""
    fd = env.LIFELINE_FD.get()
    if fd is None:
        return None
    try:
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        is_pipe = False
    if not is_pipe:  # inherited the variable, not the descriptor
        return None
    return _watch(lambda: _read_until_eof(fd), _kill_own_group, "lifeline")


def follow_connection(conn: Connection, what: str) -> threading.Thread:
    """Exit this process when the other end of ``conn`` (held by the parent only) closes."""

    def gone() -> None:
        logger.error("%s is gone; exiting", what)
        os._exit(1)

    def wait() -> None:
        while True:
            conn.recv_bytes()  # the parent never writes: this ends in EOFError

    return _watch(wait, gone, "lifeline")
