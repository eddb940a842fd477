"""Database URLs with several hosts: split in one place, and connections that skip a host that is down,
silent or not what is asked for, remember the one that worked, and leave a host that stopped taking writes."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from gateway.core import database
from gateway.core.errors import STORE_UNAVAILABLE
from gateway.core.store import Pool
from tests.support import free_port


@pytest.mark.parametrize(("dsn", "hosts"), [
    ("postgresql://u@h1:5432/db", ["postgresql://u@h1:5432/db"]),
    ("postgresql://u:pw@h1:5432,h2:5433/db?target_session_attrs=read-write",
     ["postgresql://u:pw@h1:5432/db?target_session_attrs=read-write",
      "postgresql://u:pw@h2:5433/db?target_session_attrs=read-write"]),
    ("postgres://[::1]:5432,[::2],h3/db", ["postgres://[::1]:5432/db", "postgres://[::2]/db", "postgres://h3/db"]),
    ("host=h1,h2 dbname=db", ["host=h1,h2 dbname=db"]),  # a keyword DSN goes to asyncpg whole
], ids=["one-host", "two-hosts-password", "ipv6", "keyword-dsn"])
def test_host_urls(dsn: str, hosts: list[str]) -> None:
    assert database.host_urls(dsn) == hosts


def with_hosts(url: str, *hostports: str) -> str:
    """`url` (one host) with the host list replaced: the same user, database and options."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{','.join(hostports)}"))


def hostport(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2]


@contextlib.contextmanager
def silent_host() -> Iterator[str]:
    """host:port of a listener that completes TCP handshakes (the kernel does) but never says a word: to a client
    the same as a server that hangs, or a dead machine behind a load balancer."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture(autouse=True)
def _forget_good_hosts() -> Iterator[None]:
    database._last_good.clear()
    yield
    database._last_good.clear()


async def backend_port(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT inet_server_port()"))


async def test_down_first_host_is_skipped(pg_url: str) -> None:
    url = with_hosts(pg_url, f"127.0.0.1:{free_port()}", hostport(pg_url))
    conn = await database.connect(url, timeout=5)
    try:
        assert await backend_port(conn) == urlsplit(pg_url).port
    finally:
        await conn.close()


@pytest.mark.slow
async def test_silent_first_host_costs_one_host_timeout_then_is_tried_last(pg_url: str) -> None:
    with silent_host() as silent:
        url = with_hosts(pg_url, silent, hostport(pg_url))
        started = time.monotonic()
        conn = await database.connect(url, timeout=10)
        first = time.monotonic() - started
        await conn.close()
        # asyncpg's own timeout covers the whole list: the second host would never have been tried in time
        assert database._HOST_CONNECT_SECONDS <= first < database._HOST_CONNECT_SECONDS + 1.5, first
        started = time.monotonic()
        conn = await database.connect(url, timeout=10)
        again = time.monotonic() - started
        await conn.close()
        assert again < 0.5, f"the host that answered is tried first next time: {again:.2f}s"


@pytest.mark.parametrize("attrs", ["read-only", "standby"])
async def test_no_host_of_the_kind_asked_for_reads_as_store_down(pg_url: str, attrs: str) -> None:
    """A primary is all there is here: asking for something else is what a client meets during a failover
    (only standbys left), and must be one of the errors that mean 'the store cannot answer now'."""
    for url in (f"{pg_url}?target_session_attrs={attrs}",
                with_hosts(f"{pg_url}?target_session_attrs={attrs}", f"127.0.0.1:{free_port()}", hostport(pg_url))):
        with pytest.raises(database.NoUsableHost) as info:
            await database.connect(url, timeout=5)
        assert isinstance(info.value, STORE_UNAVAILABLE)


async def test_host_list_defaults_to_read_write(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGTARGETSESSIONATTRS", raising=False)
    url = with_hosts(pg_url, hostport(pg_url), hostport(pg_url))
    conn = await database.connect(url, timeout=5)
    try:
        assert await conn.fetchval("SHOW transaction_read_only") == "off"
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def pool_on(url: str, statement_cache_size: int = 100) -> AsyncIterator[Pool]:
    pool = await database.create_pool(url, min_size=0, max_size=1, statement_cache_size=statement_cache_size)
    try:
        yield pool
    finally:
        await pool.close()


async def test_pool_over_a_host_list(pg_url: str) -> None:
    async with pool_on(with_hosts(pg_url, f"127.0.0.1:{free_port()}", hostport(pg_url))) as pool:
        assert await pool.fetchval("SELECT 1") == 1


async def test_pool_without_statement_cache(pg_url: str) -> None:
    """What a pooler in transaction mode needs: no named prepared statements kept, the jsonb codec still on."""
    async with pool_on(pg_url, statement_cache_size=0) as pool:
        for _ in range(2):
            assert await pool.fetchval("SELECT $1::jsonb", {"a": 1}) == {"a": 1}
        assert await pool.fetchval("SELECT count(*) FROM pg_prepared_statements") == 0


async def test_connection_that_met_a_read_only_host_is_not_reused(database_url: str) -> None:
    """A host that stops taking writes (fenced read-only, or demoted behind a pooler): the connection that met
    it is closed, so the next one is a new connection, which target_session_attrs sends to the primary."""
    async with pool_on(database_url) as pool:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            async with pool.acquire() as conn:
                met = await conn.fetchval("SELECT pg_backend_pid()")
                await conn.execute("SET default_transaction_read_only = on")
                await conn.execute("CREATE TABLE read_only_probe (x int)")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") != met
