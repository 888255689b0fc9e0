"""Processes of a test: stopping one, and process trees from /proc (who
descends from a pid, who is still alive)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import defaultdict

SHUTDOWN_TIMEOUT_S = 10.0


def stop_process(proc: subprocess.Popen, timeout_s: float = SHUTDOWN_TIMEOUT_S, *, kill_group: bool = False) -> None:
    """SIGTERM (a graceful stop), and SIGKILL whatever is left after ``timeout_s``.

    With ``kill_group`` the SIGKILL goes to the whole process group, always:
    the process leads its own session (``start_new_session=True``) and its
    children (an engine, say) must not outlive the test.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    if kill_group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    elif proc.poll() is None:
        proc.kill()
    proc.wait(timeout_s)


def _parent_pids() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    children: defaultdict[int, list[int]] = defaultdict(list)
    for child, parent in _parent_pids().items():
        children[parent].append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children[todo.pop()]:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def parent_pid(pid: int) -> int | None:
    """``pid``'s parent, None once it is gone."""
    return _parent_pids().get(pid)


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for its reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def command_line(pid: int) -> str:
    """What ``ps`` shows for ``pid`` (empty once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def busy_engine_main(*_args: object) -> None:
    """An engine that never reads its pipe (a model loading, a long step)."""
    import time

    while True:
        time.sleep(60)
