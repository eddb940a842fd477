"""Hosts of the test's own: network namespaces on one private bridge, processes started in them, torn down after."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from admin.devenv.processes import death_signal_setter

T = TypeVar("T")

# from <sched.h>
CLONE_NEWNET = 0x40000000
# Private addresses the test assigns inside its own namespaces: 10.213.<subnet>.0/24, one subnet per network.
ADDRESS_PREFIX = "10.213"
ROOT_HOST = 1  # the root namespace's end of the link: where the test process itself talks from
FIRST_HOST = 10
_networks = itertools.count()


class NetnsError(RuntimeError):
    """A namespace, link or address could not be set up."""


def ip(*args: str, check: bool = True) -> str:
    """Run one `ip` command (Debian iproute2); stderr is the reason when it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


@dataclass
class HostProcess:
    """A process started in a namespace host (its own session, so its whole process group can be signalled)."""

    host: Host
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and everything in its process group, as a crashed host would lose them."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self.kill()  # whatever it left behind in its group (workers, backends) goes too


@dataclass
class Host:
    """One network namespace with one address on the test's bridge."""

    name: str
    netns: str
    address: str
    network: Network = field(repr=False)
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)

    def spawn(self, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> HostProcess:
        """Start `argv` inside this namespace (`ip netns exec` execs it: the PID is the program's own)."""
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                env=dict(env) if env is not None else None,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=death_signal_setter(signal.SIGKILL),
            )
        started = HostProcess(self, process, log_path)
        self.network.processes.append(started)
        return started

    def run_inside(self, make: Callable[[], T]) -> T:
        """Call `make` on a thread that lives in this namespace: sockets it creates belong to this host, although
        the test process (in the root namespace) owns and drives them."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, f"netns-{self.name}", initializer=_enter, initargs=(self.netns,))
        return self._executor.submit(make).result(10)

    def tcp_socket(self) -> socket.socket:
        """A new, unconnected, non-blocking TCP socket of this host."""
        sock = self.run_inside(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.setblocking(False)
        return sock

    def listener(self, port: int = 0) -> socket.socket:
        """A listening TCP socket on this host's address."""
        sock = self.tcp_socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.address, port))
        sock.listen(128)
        return sock

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


_libc = ctypes.CDLL(None, use_errno=True)


def _enter(netns: str) -> None:
    """Move the calling thread (only it) into a named network namespace."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({netns}): {os.strerror(error)}")
    finally:
        os.close(fd)


@dataclass
class Network:
    """A bridge in a switch namespace of its own (empty netfilter tables, whatever the root's are), a link from
    the root namespace with address .1, and one namespace per host with .10, .11, ..."""

    tag: str
    subnet: int
    hosts: dict[str, Host] = field(default_factory=dict)
    processes: list[HostProcess] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    @property
    def cidr(self) -> str:
        return f"{ADDRESS_PREFIX}.{self.subnet}.0/24"

    @property
    def root_address(self) -> str:
        return self.address(ROOT_HOST)

    @property
    def switch(self) -> str:
        return f"{self.tag}-switch"

    def address(self, last: int) -> str:
        return f"{ADDRESS_PREFIX}.{self.subnet}.{last}"

    def _namespace(self, name: str) -> str:
        netns = f"{self.tag}-{name}"
        self.namespaces.append(netns)  # before creating it: a half-made namespace is removed too
        ip("netns", "add", netns)
        ip("-n", netns, "link", "set", "lo", "up")
        return netns

    def create(self, host_names: Sequence[str]) -> None:
        self._namespace("switch")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        root_link = f"{self.tag}r"
        ip("link", "add", root_link, "type", "veth", "peer", "name", f"{self.tag}rp", "netns", self.switch)
        ip("-n", self.switch, "link", "set", f"{self.tag}rp", "master", "br0", "up")
        ip("addr", "add", f"{self.root_address}/24", "dev", root_link)
        ip("link", "set", root_link, "up")
        for index, name in enumerate(host_names):
            netns = self._namespace(name)
            inside, outside = f"{self.tag}h{index}", f"{self.tag}p{index}"
            ip("link", "add", inside, "type", "veth", "peer", "name", outside, "netns", self.switch)
            ip("link", "set", inside, "netns", netns)
            ip("-n", netns, "link", "set", inside, "name", "eth0")
            address = self.address(FIRST_HOST + index)
            ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", netns, "link", "set", "eth0", "up")
            ip("-n", self.switch, "link", "set", outside, "master", "br0", "up")
            self.hosts[name] = Host(name, netns, address, self)

    def teardown(self) -> list[str]:
        """Kill every process started here (by PID), remove the namespaces and the root link; returns problems."""
        problems: list[str] = []
        for started in reversed(self.processes):
            try:
                started.stop(timeout=5)
            except Exception as exc:  # keep tearing down: one stuck process must not leak the namespaces
                problems.append(f"{started.pid}: {exc!r}")
        for host in self.hosts.values():
            host.close()
        for netns in reversed(self.namespaces):
            # Anything still inside was started by this test (a namespace only holds what we put in it).
            for pid in ip("netns", "pids", netns, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                ip("netns", "del", netns)
            except NetnsError as exc:
                problems.append(str(exc))
        ip("link", "del", f"{self.tag}r", check=False)  # normally gone with its peer in the switch namespace
        return problems


def _taken_subnets() -> set[int]:
    """Third octets of 10.213.x.0/24 already addressed or routed in the root namespace."""
    taken = set()
    for line in (ip("-o", "-4", "addr", "show") + ip("-4", "route", "show")).splitlines():
        for word in line.replace("/", " ").split():
            parts = word.split(".")
            if len(parts) == 4 and ".".join(parts[:2]) == ADDRESS_PREFIX and parts[2].isdigit():
                taken.add(int(parts[2]))
    return taken


def _free_tag_and_subnet() -> tuple[str, int]:
    """Interface names are at most 15 characters: `cg` + 3 PID digits + a sequence letter + a short suffix."""
    namespaces = {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}
    links = ip("-o", "link", "show")
    taken = _taken_subnets()
    for _ in range(26):
        sequence = next(_networks)
        tag = f"cg{os.getpid() % 1000:03d}{chr(ord('a') + sequence % 26)}"
        if f"{tag}r:" in links or any(ns.startswith(tag + "-") for ns in namespaces):
            continue  # left over by a crashed run with the same PID digits
        subnet = 20 + (os.getpid() + sequence) % 230
        while subnet in taken:
            subnet = 20 + (subnet - 19) % 230
        return tag, subnet
    raise NetnsError("no free interface tag: clean up leftover cg* namespaces (ip netns list)")


@contextlib.contextmanager
def network(host_names: Sequence[str]) -> Iterator[Network]:
    """Namespace hosts for one test. If they cannot be created the test fails with the reason (never skips:
    CI runs as root here); everything is removed afterwards, whatever happened."""
    try:
        tag, subnet = _free_tag_and_subnet()
    except (NetnsError, OSError) as exc:
        pytest.fail(f"cannot use network namespaces here: {exc}")
    net = Network(tag, subnet)
    try:
        try:
            net.create(host_names)
        except (NetnsError, OSError) as exc:
            pytest.fail(f"cannot create network namespaces (needs root and iproute2): {exc}")
        yield net
    finally:
        problems = net.teardown()
    assert not problems, f"teardown of {tag}: {problems}"  # reached only when the test itself passed


def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    """Poll a synchronous check (a server starting) until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.05)


def accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False
