"""The Postgres connection pool every credgate process uses: typed, and bounded in how long anything waits on it.

asyncpg returns a connection whose query was cancelled (a deadline passed, a client went away) to the pool
only after the server acknowledged the cancellation; a frozen or partitioned server never does, so the
release would hang as long as the server. Here such a connection is closed instead: a deadline is the
longest a caller waits, whatever the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg

from gateway.core.store import Connection, Pool, Record, json_encode


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


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> Pool:
    """A pool with the statement cache on and a JSON codec for jsonb columns."""

    async def init(conn: asyncpg.Connection) -> None:
        await conn.set_type_codec("jsonb", encoder=json_encode, decoder=json.loads, schema="pg_catalog")

    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init,
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
