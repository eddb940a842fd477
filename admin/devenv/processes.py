"""Child processes of the embedded servers: ports on 127.0.0.1, environment, death signal, killing a process tree."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# Readiness and exits are polled; 10 ms keeps start-up latency low without busy-looping.
POLL_INTERVAL_S = 0.01

_HAVE_PROC = Path("/proc/self/stat").exists()
_DEAD_STATES = ("Z", "X")  # zombie, dead: exited, only waiting to be reaped

# from <linux/prctl.h>
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_libc: ctypes.CDLL | None = None


# -- ports --


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (someone may take it before we bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- starting children --


def child_environment() -> dict[str, str]:
    """Our environment without what would change how the servers and psql behave."""
    # PG* variables (PGOPTIONS, PGSSLMODE, PGSERVICE...) would change how psql connects; drop them.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    # Server messages in English and no dependency on the locales installed on this machine.
    environment["LC_ALL"] = "C"
    return environment


def _linux_libc() -> ctypes.CDLL | None:
    global _libc
    if sys.platform != "linux":
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def death_signal_setter(death_signal: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send `death_signal` to the child when we die, so a crash leaks nothing."""
    # The kernel sends the signal when the *thread* that forked exits, so only the main thread,
    # which lives as long as the process, may ask for it.
    libc = _linux_libc()  # loaded before fork: the child only calls into it
    if libc is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl = libc.prctl
    parent_pid = os.getpid()

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if os.getppid() != parent_pid:  # we died between fork and prctl
            os.kill(os.getpid(), death_signal)

    return set_death_signal


# -- looking at processes --


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def is_alive(pid: int) -> bool:
    """True if PID runs and is not a zombie."""
    if _HAVE_PROC:
        fields = _proc_stat(pid)
        return fields is not None and fields[0] not in _DEAD_STATES
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _children_of(parent: int) -> list[int]:
    if not _HAVE_PROC:
        return []
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields is not None and fields[1] == str(parent):
                children.append(int(entry))
    return children


# -- killing a process tree --


def kill_tree(process: subprocess.Popen[bytes], gone_within: float) -> None:
    """SIGKILL a server and the processes it started, and collect all their exit statuses."""
    if process.poll() is not None:
        return  # already reaped: its PID may belong to someone else by now
    with _adopting_orphans():
        # Stopped first so that it cannot start another child while we collect its children.
        # (Postgres backends call setsid(), so killing the server's process group would miss them.)
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGSTOP)
        children = _children_of(process.pid)
        for pid in (process.pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
    _wait_gone(children, gone_within)


@contextlib.contextmanager
def _adopting_orphans() -> Iterator[None]:
    """Make us the Linux "subreaper" of our descendants for a moment.

    When a postmaster is killed its backends are re-parented; to init normally, but PID 1 in many
    containers never reaps, which would leave zombies. Adopting them lets _wait_gone reap them.
    """
    libc = _linux_libc()
    if libc is None:
        yield
        return
    previous = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, previous.value, 0, 0, 0)


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until these processes have exited, reaping the ones that became our children."""
    deadline = time.monotonic() + timeout
    our_pid = str(os.getpid())
    remaining = list(pids)
    while remaining:
        for pid in list(remaining):
            fields = _proc_stat(pid)
            if fields is not None and fields[0] in _DEAD_STATES and fields[1] == our_pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                fields = _proc_stat(pid)
            if fields is None or fields[0] in _DEAD_STATES:
                remaining.remove(pid)
        if remaining and time.monotonic() > deadline:
            logger.warning("processes %s are still exiting after %.0fs", remaining, timeout)
            return
        if remaining:
            time.sleep(POLL_INTERVAL_S)
