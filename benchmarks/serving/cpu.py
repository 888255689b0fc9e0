"""CPU time of processes and of the whole machine, read from ``/proc``.

A token that reaches a client has been paid for in CPU time by every process
it crossed; these readers give that time per process (utime + stime of all its
threads), per process tree, and for the machine as a whole, so that a run's
cost can be split between the parts under test and everything else.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

from pdserve.benchmarks.serving.procs import log

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
ENGINE_CMDLINE_MARK = "spawn_main"
IDLE_WINDOW_S = 2.0


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a live process (all its threads, live or exited), or None."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def proc_cmdline(pid: int) -> str:
    """The command line of a process, arguments joined by spaces; empty when gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def proc_parents() -> dict[int, int]:
    """pid -> parent pid of every live process."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        fields = _stat_fields(entry) if entry.isdigit() else None
        if fields is not None:
            parents[int(entry)] = int(fields[1])
    return parents


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in proc_parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def split_front_engine(root_pid: int, engine_mark: str = ENGINE_CMDLINE_MARK) -> tuple[list[int], list[int]]:
    """The serve tree split in two: the engine (the spawn child whose command line
    holds ``engine_mark``, with its descendants) and the front (everything else)."""
    engine: list[int] = []
    for pid in process_tree(root_pid):
        if pid != root_pid and pid not in engine and engine_mark in proc_cmdline(pid):
            engine.extend(process_tree(pid))
    front = [pid for pid in process_tree(root_pid) if pid not in engine]
    return front, engine


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of a set of processes at one moment."""

    cpu_s: dict[int, float]
    at_s: float

    @classmethod
    def take(cls, pids: list[int]) -> CpuSnapshot:
        values = {pid: proc_cpu_s(pid) for pid in pids}
        return cls({pid: v for pid, v in values.items() if v is not None}, time.perf_counter())

    def since(self, before: CpuSnapshot) -> float:
        """CPU seconds spent between ``before`` and this snapshot (new pids from zero)."""
        return sum(v - before.cpu_s.get(pid, 0.0) for pid, v in self.cpu_s.items())


def system_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, steal excluded), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:8]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS_PER_S


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children, all of them so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until_idle(max_wait_s: float, idle_cores: float, window_s: float = IDLE_WINDOW_S) -> float:
    """Wait (at most ``max_wait_s``) until the machine stays under ``idle_cores`` busy
    cores for ``window_s``, so that foreign load does not skew latencies; returns
    the busy cores of the last window."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0 = system_busy_s()
        time.sleep(window_s)
        busy_cores = (system_busy_s() - busy0) / window_s
        if busy_cores < idle_cores or time.monotonic() >= deadline:
            if busy_cores >= idle_cores and max_wait_s > 0:
                log(f"warning: machine still {busy_cores:.2f} cores busy after {max_wait_s:g} s; measuring anyway")
            return busy_cores
        log(f"machine {busy_cores:.2f} cores busy by others; waiting")


def idle_before_run(wait_idle_s: float, idle_cores: float) -> float | None:
    """The busy cores before a run when ``wait_idle_s`` asks to wait for quiet, else None."""
    return wait_until_idle(wait_idle_s, idle_cores) if wait_idle_s else None
