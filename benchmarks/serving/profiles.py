"""Where a measured process spends its CPU: py-spy profiles and their top functions.

CPU per token says how much a process costs; a profile says on what. A
profiled run's CPU figures include the sampler's disturbance.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.benchmarks.serving.procs import Child, log, start_child, stop_child

PROFILER_STOP_S = 60.0


@dataclass
class Profiler:
    """``py-spy record --format raw`` on one process until stopped (or for a fixed duration)."""

    child: Child | None
    raw_path: Path

    @classmethod
    def start(cls, pid: int, raw_path: Path, log_dir: Path, rate_hz: int, native: bool = False,
              subprocesses: bool = False, duration_s: int | None = None) -> Profiler:
        exe = shutil.which("py-spy")
        if exe is None:
            log("warning: py-spy not found (pip install py-spy): no profile")
            return cls(None, raw_path)
        argv = [exe, "record", "--pid", str(pid), "--format", "raw", "--nolineno", "--rate", str(rate_hz),
                "--output", str(raw_path)]
        argv += ["--native"] if native else ["--nonblocking"]  # native unwinding must pause the process
        argv += ["--subprocesses"] if subprocesses else []
        argv += ["--duration", str(duration_s)] if duration_s is not None else []
        return cls(start_child(f"py-spy-{raw_path.stem}", argv, log_dir), raw_path)

    def wait(self) -> None:
        """Until a recording of fixed duration has ended and written its file."""
        if self.child is not None:
            self.child.proc.wait()

    def stop(self, top_n: int) -> dict[str, Any] | None:
        """Ends the recording; its ``top_n`` functions, or None when there is no profile."""
        if self.child is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.child.proc.send_signal(signal.SIGINT)
        try:
            self.child.proc.wait(timeout=PROFILER_STOP_S)
        except subprocess.TimeoutExpired:
            stop_child(self.child)
        if not self.raw_path.exists():
            log(f"warning: py-spy wrote no profile:\n{self.child.log_tail()}")
            return None
        return summarise_collapsed(self.raw_path.read_text(errors="replace"), top_n)


def summarise_collapsed(text: str, top_n: int) -> dict[str, Any]:
    """Top functions of collapsed stacks (``f1;f2;...;leaf COUNT``) by inclusive and own samples."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")] or ["<unknown>"]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def top(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": name, "samples": n, "inclusive_pct": 100.0 * inclusive[name] / total,
                 "own_pct": 100.0 * own[name] / total} for name, n in counter.most_common(top_n)]

    return {"total_samples": total, "top_inclusive": top(inclusive) if total else [],
            "top_own": top(own) if total else []}
