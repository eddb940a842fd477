"""Processes the benchmark starts: spawn pinned, find their descendants, pin, CPU and RSS accounting, kill by PID."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def children(pid: int) -> list[int]:
    """Direct children of pid (every thread's children file)."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            found.extend(int(c) for c in f.read().split())
    return found


def tree(root: int) -> list[int]:
    """root and all its descendants."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children(pid))
    return out


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: tells a process apart from a later one that reuses its PID."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def threads(pids: Iterable[int]) -> list[int]:
    tids: list[int] = []
    for pid in pids:
        with contextlib.suppress(OSError):
            tids.extend(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    return tids


def pin(pids: Iterable[int], cpus: set[int]) -> None:
    """Move every thread of these processes to cpus (threads created later inherit their creator's mask)."""
    for tid in threads(pids):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


def cpu_ns(pids: Iterable[int]) -> int:
    """On-CPU nanoseconds of every live thread of these processes (/proc/<pid>/task/<tid>/schedstat)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total


def rss_kib(pid: int) -> int:
    """Resident set size of pid in KiB (VmRSS), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_times() -> dict[str, list[int]]:
    """Per-core jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    snap: dict[str, list[int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                parts = line.split()
                snap[parts[0]] = [int(x) for x in parts[1:9]]
    return snap


def core_usage(before: Mapping[str, list[int]], after: Mapping[str, list[int]], name: str) -> tuple[float, float]:
    """(busy %, steal %) of one /proc/stat line ("cpu0", or "cpu" for the whole machine) between two snapshots."""
    delta = [b - a for a, b in zip(before[name], after[name], strict=True)]
    total = sum(delta) or 1
    idle = delta[3] + delta[4]
    return 100.0 * (total - idle) / total, 100.0 * delta[7] / total


def _preexec(cpus: set[int] | None) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        # Our children die with us even if we are SIGKILLed (then nothing else could stop them).
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class Processes:
    """Every process the harness starts; stop_all() ends them and their descendants, by PID only."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []
        # root pid -> {pid: start time} of every descendant seen, so stragglers can be killed without touching
        # a reused PID or another root's processes
        self.known: dict[int, dict[int, str | None]] = {}

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cpus: set[int] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start cmd with stdout and stderr to logs/<name>.log, pinned to cpus; in its own session (Ctrl-C
        reaches only the harness, which then stops everything in order)."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop_all()
        process = subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=_preexec(cpus),
            start_new_session=True,
        )
        self.started.append((name, process, log))
        self.remember(process.pid)
        return process

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def remember(self, root: int) -> None:
        """Note root's current descendants (call it once they run: e.g. nginx or gateway workers)."""
        seen = self.known.setdefault(root, {})
        for pid in tree(root):
            seen.setdefault(pid, start_time(pid))

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM one started process, wait, then SIGKILL it and any descendant still alive."""
        self.remember(process.pid)
        with contextlib.suppress(ProcessLookupError):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._kill_stragglers(process.pid)
        for i, (_name, proc, log) in enumerate(self.started):
            if proc is process:
                log.close()
                del self.started[i]
                break

    def stop_all(self) -> None:
        for _name, process, _log in reversed(self.started):
            self.remember(process.pid)
            with contextlib.suppress(ProcessLookupError):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _name, process, log in reversed(self.started):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        self.started.clear()
        for root in list(self.known):
            self._kill_stragglers(root)

    def _kill_stragglers(self, root: int) -> None:
        for pid, started in self.known.pop(root, {}).items():
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
