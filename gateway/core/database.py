"""The Postgres connections every credgate process uses: typed, bounded in waiting, and on the primary.

asyncpg returns a connection whose query was cancelled (a deadline passed, a client went away) to the pool
only after the server acknowledged the cancellation; a frozen or partitioned server never does, so the
release would hang as long as the server. Here such a connection is closed instead: a deadline is the
longest a caller waits, whatever the server does.

A URL may name several hosts (`postgresql://u@h1:5432,h2:5432/db`, a primary and its standbys): every new
connection, the pool's and the LISTEN connection's alike, goes to one that accepts writes, so after a
failover the next connection finds the promoted standby (see `connect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from gateway.core.errors import STORE_UNAVAILABLE
from gateway.core.store import Connection, Pool, Record, json_encode

# A host that has not let us in within this long is left for the next one in the URL. libpq's connect_timeout
# is per host too; asyncpg's timeout covers the whole list, so a first host that drops packets (a dead machine
# answers nothing, it does not refuse) would use it all up and the standby promoted in its place never be tried.
_HOST_CONNECT_SECONDS = 2.0

# Why one host could not be used and the next one should be tried: it is down or refusing, still starting,
# or up but not what target_session_attrs asks for (a standby when writes are needed).
_TRY_NEXT_HOST = (*STORE_UNAVAILABLE, asyncpg.TargetServerAttributeNotMatched)

# Per host list: the index of the host that last accepted, tried first next time. After a failover that is the
# promoted standby, so the dead primary's timeout is paid once per process, not by every new connection.
_last_good: dict[tuple[str, ...], int] = {}


class NoUsableHost(ConnectionError):
    """No host of the database URL accepted a session of the kind asked for (one of STORE_UNAVAILABLE)."""


def host_urls(dsn: str) -> list[str]:
    """One URL per host of a postgresql:// URL that lists several (`h1:p1,h2:p2`), in order; else `[dsn]`."""
    parts = urlsplit(dsn)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    if parts.scheme not in ("postgresql", "postgres") or "," not in hostlist:
        return [dsn]
    return [urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}")) for host in hostlist.split(",")]


def _host_label(url: str) -> str:
    """host:port of a one-host URL, for messages (never the user or password)."""
    return urlsplit(url).netloc.rpartition("@")[2] or "default host"


def _host_list_attrs(dsn: str) -> str | None:
    """What to ask of each host of a list: nothing when the URL (or PGTARGETSESSIONATTRS) says, for asyncpg to
    read it there; otherwise read-write, as the other hosts are standbys that credgate cannot write to (libpq's
    default, any, would settle for the first host that answers)."""
    if "target_session_attrs" in parse_qs(urlsplit(dsn).query) or os.environ.get("PGTARGETSESSIONATTRS"):
        return None
    return "read-write"


async def connect(dsn: str, *, timeout: float = 60.0, **kwargs: Any) -> asyncpg.Connection:  # noqa: ASYNC109
    """A connection to the first host of `dsn` that accepts one of the kind asked for (read-write by default
    when `dsn` lists several hosts), trying the host that accepted last time first.

    Each host gets at most `_HOST_CONNECT_SECONDS` of the overall `timeout`. A host that is down, refusing,
    starting, silent or of the wrong kind is skipped; any other error (a wrong password, a missing database)
    is raised at once, as it would be the same everywhere. None left: NoUsableHost. The signature is
    asyncpg.connect's (`timeout` included): the pool calls this in its place.
    """
    urls = host_urls(dsn)
    if len(urls) == 1:
        try:
            return await asyncpg.connect(dsn, timeout=timeout, **kwargs)
        except asyncpg.TargetServerAttributeNotMatched as exc:  # not an OSError: make it read as "store down"
            raise NoUsableHost(f"{_host_label(dsn)}: {exc}") from None
    attrs = kwargs.pop("target_session_attrs", None) or _host_list_attrs(dsn)
    if attrs is not None:
        kwargs["target_session_attrs"] = attrs
    key = tuple(_host_label(url) for url in urls)
    first = _last_good.get(key, 0)
    order = [first] + [i for i in range(len(urls)) if i != first]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    failures: list[str] = []
    for index in order:
        remaining = deadline - loop.time()
        if remaining <= 0:
            failures.append(f"{key[index]}: not tried (timeout)")
            continue
        try:
            conn = await asyncpg.connect(urls[index], timeout=min(_HOST_CONNECT_SECONDS, remaining), **kwargs)
        except _TRY_NEXT_HOST as exc:
            failures.append(f"{key[index]}: {exc.__class__.__name__}")
            continue
        _last_good[key] = index
        return conn
    raise NoUsableHost("no host of the database URL could be used: " + "; ".join(failures))


class _CancelSafePool:
    """An asyncpg pool whose connections are closed, never reused, when the work on them is interrupted."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def acquire(self, *, timeout: float | None = None) -> AsyncIterator[Connection]:  # noqa: ASYNC109
        async with self._pool.acquire(timeout=timeout) as conn:
            try:
                yield cast(Connection, conn)
            except (asyncio.CancelledError, TimeoutError):
                conn.terminate()  # a query may still be running: the release must not wait for it
                raise
            except asyncpg.ReadOnlySQLTransactionError:
                # The host stopped taking writes (demoted, or fenced read-only): a new connection looks for the
                # one that does instead of this one being handed out again.
                conn.terminate()
                raise

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as conn:
            return await conn.execute(query, *args)

    async def fetch(self, query: str, *args: Any) -> list[Record]:
        async with self.acquire() as conn:
            return await conn.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Record | None:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args, timeout=timeout)

    async def close(self) -> None:
        await self._pool.close()

    def terminate(self) -> None:
        self._pool.terminate()

    def get_size(self) -> int:
        return int(self._pool.get_size())

    def get_idle_size(self) -> int:
        return int(self._pool.get_idle_size())


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, statement_cache_size: int = 100) -> Pool:
    """A pool with a JSON codec for jsonb columns, connecting through `connect` (so to the primary of a host
    list, whichever host that is now).

    `statement_cache_size` is asyncpg's cache of named prepared statements (its default, 100); 0 turns it off,
    which a pooler in transaction mode needs unless it tracks prepared statements itself (deploy/STORES.md).
    """

    async def init(conn: asyncpg.Connection) -> None:
        await conn.set_type_codec("jsonb", encoder=json_encode, decoder=json.loads, schema="pg_catalog")

    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init,
        connect=connect,
        statement_cache_size=statement_cache_size,
        command_timeout=30,
        server_settings={"application_name": "credgate"},
    )
    return _CancelSafePool(pool)  # the one place asyncpg's untyped pool enters


@contextlib.asynccontextmanager
async def within(pool: Pool, seconds: float) -> AsyncIterator[Connection]:
    """A connection for work that must be done within `seconds`, the wait for a free connection included.

    Past the deadline: TimeoutError (one of STORE_ERRORS), and the connection is closed rather than reused.
    """
    async with asyncio.timeout(seconds), pool.acquire() as conn:
        yield conn
