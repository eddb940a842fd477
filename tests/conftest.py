"""Shared fixtures: real Postgres and Redis (embedded unless test URLs are given), one fresh database per test."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from gateway.core import database, store
from gateway.core.settings import Settings, load_settings
from tests.support import Upstream, server_dir, start_upstream

TEST_SECRET_KEY = "test-server-key-" + "x" * 32
# Small argon2 parameters keep the suite fast; test_hashing checks the production defaults separately.
FAST_ARGON2 = {"CREDGATE_ARGON2_MEMORY_KIB": "1024", "CREDGATE_ARGON2_TIME_COST": "1"}


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Postgres server for the whole session (its `postgres` database)."""
    given = os.environ.get("CREDGATE_TEST_DATABASE_URL")
    if given:
        yield given
        return
    from admin.devenv.postgres_server import EmbeddedPostgres

    with server_dir("test-pg") as data:
        server = EmbeddedPostgres(data / "pg")
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("CREDGATE_TEST_REDIS_URL")
    if given:
        yield given
        return
    from admin.devenv.redis_server import EmbeddedRedis

    with server_dir("test-redis") as data:
        server = EmbeddedRedis(data / "redis")
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


TEMPLATE_DB = f"credgate_tpl_{os.getpid()}"


@pytest.fixture(scope="session")
def template_db(pg_url: str) -> Iterator[str]:
    """A migrated template database; each test copies it (CREATE DATABASE ... TEMPLATE is fast)."""

    async def setup() -> None:
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
            await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(_with_database(pg_url, TEMPLATE_DB))
        try:
            await store.migrate(conn)
        finally:
            await conn.close()

    async def teardown() -> None:
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(setup())
    yield TEMPLATE_DB
    asyncio.run(teardown())


@pytest.fixture
async def database_url(pg_url: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"credgate_t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    yield _with_database(pg_url, name)
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def empty_database_url(pg_url: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"credgate_e_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(pg_url, name)
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def clean_redis_url(redis_url: str) -> AsyncIterator[str]:
    """The session Redis, flushed before the test."""
    client = aioredis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    yield redis_url


@pytest.fixture
def env(database_url: str, clean_redis_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment for a credgate process (CLI, gateway, admin) bound to this test's database and Redis."""
    return credgate_env(database_url, clean_redis_url, tmp_path)


def credgate_env(database_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a credgate process (CLI, gateway, admin) bound to these servers, fast argon2."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CREDGATE_")}
    base.update(FAST_ARGON2)
    base.update(
        {
            "CREDGATE_DATABASE_URL": database_url,
            "CREDGATE_REDIS_URL": redis_url,
            "CREDGATE_SECRET_KEY": TEST_SECRET_KEY,
            "CREDGATE_DATA_DIR": str(tmp_path / "data"),
        }
    )
    return base


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(None, env=env)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Any]:
    p = await database.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A real echoing upstream on 127.0.0.1 (see tests.support.start_upstream)."""
    up = await start_upstream()
    try:
        yield up
    finally:
        await up.runner.cleanup()
