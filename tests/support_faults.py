"""Helpers for fault, streaming and lifecycle tests: private stores to break, scripted upstreams, raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httptools

from admin.devenv.child_server import ChildServer
from admin.devenv.postgres_server import EmbeddedPostgres
from admin.devenv.redis_server import EmbeddedRedis
from gateway.core import store
from tests.conftest import credgate_env
from tests.support import cli, metric, scrape, server_dir

# --- stores a test may break ------------------------------------------------------------------------------


@dataclass
class PrivateStores:
    """A Postgres and a Redis owned by one test (never the session's), and a credgate env bound to them."""

    postgres: EmbeddedPostgres
    redis: EmbeddedRedis
    env: dict[str, str]


@contextlib.asynccontextmanager
async def private_stores(tmp_path: Path) -> AsyncIterator[PrivateStores]:
    """Start a migrated Postgres and a Redis under tmp_path; both stopped (by their own PIDs) afterwards."""
    with server_dir("fault-stores") as data:
        async with _private_stores(data, tmp_path) as stores:
            yield stores


@contextlib.asynccontextmanager
async def _private_stores(data: Path, tmp_path: Path) -> AsyncIterator[PrivateStores]:
    postgres = EmbeddedPostgres(data / "pg")
    redis = EmbeddedRedis(data / "redis")
    try:
        await asyncio.to_thread(postgres.start)
        await asyncio.to_thread(redis.start)
        conn = await asyncpg.connect(postgres.url)
        try:
            await store.migrate(conn)
        finally:
            await conn.close()
        yield PrivateStores(postgres, redis, credgate_env(postgres.url, redis.url, tmp_path))
    finally:
        await asyncio.to_thread(redis.stop)
        await asyncio.to_thread(postgres.stop)


async def create_token(env: dict[str, str], owner: str, *, create_owner: bool = True) -> dict[str, Any]:
    """A new bearer token (CLI JSON: id, token, ...) owned by a service account, created first if asked."""
    if create_owner:
        await cli(env, "users", "create", owner, "--service")
    created: dict[str, Any] = json.loads(await cli(env, "credentials", "create", "--owner", owner, "--kind", "token"))
    return created


# --- polling, HTTP and metrics ----------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str, interval: float = 0.05) -> float:
    """Poll `check` until it holds; returns the seconds it took, fails the test after `within` seconds."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(interval)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_get(url: str, headers: dict[str, str] | None = None, limit: float = 10) -> Reply:
    """One GET on a fresh connection (so that SO_REUSEPORT may pick any worker), `limit` seconds at most."""
    connector = aiohttp.TCPConnector(force_close=True)
    client_timeout = aiohttp.ClientTimeout(total=limit)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session, session.get(
            url, headers=headers or {}) as resp:
        return Reply(resp.status, dict(resp.headers), await resp.read())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def gauge_is(metrics_port: int, name: str, value: float) -> bool:
    return metric(await scrape(metrics_port), name) == value


# --- processes --------------------------------------------------------------------------------------------


def children_of(parent: int) -> list[int]:
    """PIDs whose parent is `parent` (from /proc/*/stat): the gateway supervisor's workers."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == str(parent) and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def is_running(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# --- raw HTTP/1.1 on a socket ------------------------------------------------------------------------------


@dataclass
class RawResponse:
    """A response read off a raw socket, and whether the server closed the connection after it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class _ResponseReader:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.done = False
        self.head_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def read_response(reader: asyncio.StreamReader, limit: float = 10) -> RawResponse:
    """Read one response (head and body) and then check, briefly, whether the server closed the connection."""
    collected = _ResponseReader()
    parser: Any = httptools.HttpResponseParser(collected)
    async with asyncio.timeout(limit):
        while not collected.done:
            data = await reader.read(65536)
            if not data:
                if collected.head_done:  # a close-delimited body ends here
                    with contextlib.suppress(httptools.HttpParserError):
                        parser.feed_data(b"")
                    break
                raise AssertionError("connection closed before a complete response")
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                break  # a 101: what follows is not HTTP
    closed = reader.at_eof()
    if not closed:
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(0.3):
                closed = await reader.read(1) == b""
    return RawResponse(parser.get_status_code(), collected.headers, bytes(collected.body), closed)


async def raw_exchange(port: int, request: bytes, limit: float = 10) -> RawResponse:
    """Send `request` bytes on a new connection to 127.0.0.1:port and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()
        return await read_response(reader, limit)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --- upstreams that misbehave -------------------------------------------------------------------------------


@dataclass
class ScriptedUpstream:
    """A raw TCP upstream: records every connection and byte; answers each request head with `reply` (and
    closes) or, when `reply` is None, never answers at all (a hung upstream)."""

    reply: bytes | None
    port: int = 0
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        head = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.received += data
                head += data
                if self.reply is not None and b"\r\n\r\n" in head:
                    writer.write(self.reply)
                    await writer.drain()
                    break
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:  # they end on the EOF of the connections closed above
            await asyncio.wait(list(self._handlers), timeout=2)


@contextlib.asynccontextmanager
async def scripted_upstream(reply: bytes | None) -> AsyncIterator[ScriptedUpstream]:
    upstream = await ScriptedUpstream(reply).start()
    try:
        yield upstream
    finally:
        await upstream.stop()


# --- stores that hang, and a change feed that breaks -------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and every process descending from it (from /proc), parents before their children."""
    tree, generation = [root], [root]
    for _ in range(8):  # a server's tree is shallow (postmaster -> backends); bound the walk anyway
        generation = [child for parent in generation for child in children_of(parent)]
        if not generation:
            break
        tree += generation
    return tree


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@contextlib.contextmanager
def frozen(server: ChildServer) -> Iterator[list[int]]:
    """SIGSTOP an embedded server and every process it started (a hung host: connections are accepted by the
    kernel, nothing answers), and SIGCONT them all on the way out, whatever happened. Yields the PIDs."""
    root = server.pid
    assert root is not None, f"{server!r} is not running"
    stopped: list[int] = []
    try:
        # The parent first, so that it forks nothing new; then whatever it had started, until nothing is new.
        for _ in range(10):
            new = [pid for pid in process_tree(root) if pid not in stopped]
            if not new:
                break
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        deadline = time.monotonic() + 2
        while any(_state(pid) not in ("T", "t", None) for pid in stopped):
            assert time.monotonic() < deadline, f"{server!r}: not every process stopped"
            time.sleep(0.01)
        yield stopped
    finally:
        for pid in reversed(stopped):  # children first, the parent last
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def run_script(dsn: str, script: str) -> None:
    """Run several `;`-separated statements as `psql -c` does: one simple-query message, so one implicit
    transaction, committed after the last statement (asyncpg's execute without arguments)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(script)
    finally:
        await conn.close()


# The application_name of a gateway worker's LISTEN connection (gateway.invalidation).
LISTEN_APPLICATION = "credgate-listen"
LISTEN_BACKENDS = "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
TERMINATE_LISTEN_BACKENDS = (
    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{LISTEN_APPLICATION}'"
)


async def listen_backends(conn: store.Connection) -> set[int]:
    """PIDs of the Postgres backends serving gateway LISTEN connections now."""
    return {row[0] for row in await conn.fetch(LISTEN_BACKENDS, LISTEN_APPLICATION)}


def sql_name(name: str) -> str:
    """A role or credential id safe to paste into a simple-query script (which cannot take parameters)."""
    assert re.fullmatch(r"[A-Za-z0-9_-]+", name), name
    return name


async def login_role(postgres: EmbeddedPostgres, role: str) -> str:
    """A LOGIN role of its own (not the superuser the CLI and the test use) with what a gateway needs on the
    migrated schema; returns a database URL that connects as it."""
    role = sql_name(role)
    await run_script(postgres.url, f"""
        CREATE ROLE "{role}" LOGIN;
        GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}";
        GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}";
    """)
    return f"postgresql://{role}@127.0.0.1:{postgres.port}/postgres"


async def timed_request(method: str, url: str, headers: dict[str, str] | None = None, data: str | None = None,
                        limit: float = 10) -> tuple[Reply | None, float]:
    """One request on a fresh connection and the seconds it took; None instead of a reply after `limit` s."""
    started = time.monotonic()
    connector = aiohttp.TCPConnector(force_close=True)
    client_timeout = aiohttp.ClientTimeout(total=limit)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session, session.request(
                method, url, headers=headers or {}, data=data) as resp:
            reply: Reply | None = Reply(resp.status, dict(resp.headers), await resp.read())
    except TimeoutError:
        reply = None
    return reply, time.monotonic() - started


# Set when CREDGATE_DEBUG_WORKER_HEADER=1: the PID of the worker that answered.
WORKER_HEADER = "X-Credgate-Worker"


async def workers_answering(url: str, token: str, status: int, workers: int, within: float = 10) -> set[str]:
    """Requests with `token` on fresh connections until `workers` distinct workers answered `status` (any
    other status fails the test); returns their ids (needs CREDGATE_DEBUG_WORKER_HEADER=1)."""
    answered: set[str] = set()

    async def check() -> bool:
        reply = await http_get(url, bearer(token))
        assert reply.status == status, (reply.status, reply.body)
        answered.add(reply.headers[WORKER_HEADER])
        return len(answered) >= workers

    await eventually(check, within, f"{workers} workers answering {status}", interval=0.01)
    return answered
