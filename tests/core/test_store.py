"""The store: migrations (twice, concurrently), append-only audit, change notifications."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from gateway.core import store


async def test_migrate_twice_is_a_no_op(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        first = await store.migrate(conn)
        second = await store.migrate(conn)
        assert first == [v for v, _ in store.migration_files()]
        assert second == []
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in versions] == first
    finally:
        await conn.close()


async def test_migrate_concurrently_gives_one_schema(empty_database_url: str) -> None:
    conns = [await asyncpg.connect(empty_database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(store.migrate(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, len(store.migration_files())]
        tables = await conns[0].fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'credentials'"
        )
        assert tables == 1
    finally:
        for c in conns:
            await c.close()


async def _principal(pool: Any, name: str = "alice") -> int:
    return int(await pool.fetchval("INSERT INTO principals (name, kind) VALUES ($1, 'user') RETURNING id", name))


async def test_audit_rows_cannot_be_updated_or_deleted(pool: Any) -> None:
    async with pool.acquire() as conn:
        await store.write_audit(conn, store.Actor("cli:test"), "x.test", "thing", "t1", {"a": 1})
        for sql in ("UPDATE audit_events SET action = 'forged'", "DELETE FROM audit_events", "TRUNCATE audit_events"):
            with pytest.raises(asyncpg.PostgresError, match="append-only"):
                await conn.execute(sql)
        row = await conn.fetchrow("SELECT action, changes FROM audit_events")
        assert row["action"] == "x.test" and row["changes"] == {"a": 1}


async def test_changes_made_with_plain_sql_notify(pool: Any, database_url: str) -> None:
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(store.NOTIFY_CHANNEL, lambda *a: received.put_nowait(json.loads(a[3])))
    try:
        owner = await _principal(pool)
        await pool.execute(
            "INSERT INTO credentials (public_id, kind, secret_hash, owner_id, created_by) "
            "VALUES ('abcdefghijkl', 'token', '$argon2id$x', $1, 'test')",
            owner,
        )
        assert (await asyncio.wait_for(received.get(), 5))["id"] == "abcdefghijkl"
        await pool.execute("UPDATE credentials SET last_used_at = now()")  # not an auth change: silent
        await pool.execute("UPDATE credentials SET revoked_at = now()")
        event = await asyncio.wait_for(received.get(), 5)
        assert event["t"] == "c" and event["id"] == "abcdefghijkl" and event["ts"] > 0
        await pool.execute("UPDATE principals SET disabled = true WHERE id = $1", owner)
        assert await asyncio.wait_for(received.get(), 5) == {
            "t": "p",
            "id": str(owner),
            "ts": pytest.approx(event["ts"], abs=60),
            "seq": event["seq"] + 1,  # the change sequence counts committed changes in order (migration 004)
        }
        gid = await pool.fetchval("INSERT INTO permission_groups (name) VALUES ('g') RETURNING id")
        await pool.execute("INSERT INTO memberships VALUES ($1, $2)", owner, gid)
        assert (await asyncio.wait_for(received.get(), 5))["t"] == "p"
        await pool.execute("UPDATE permission_groups SET name = 'g2'")
        assert (await asyncio.wait_for(received.get(), 5))["t"] == "all"
        assert received.empty()
    finally:
        await listener.close()


async def test_auth_record_carries_owner_and_groups(pool: Any) -> None:
    owner = await _principal(pool, "bob")
    gid = await pool.fetchval("INSERT INTO permission_groups (name) VALUES ('finance') RETURNING id")
    await pool.execute("INSERT INTO memberships VALUES ($1, $2)", owner, gid)
    await pool.execute(
        "INSERT INTO credentials (public_id, kind, secret_hash, owner_id, created_by, name) "
        "VALUES ('AAAAAAAAAAAA', 'key', '$argon2id$x', $1, 'cli:root', 'ci')",
        owner,
    )
    async with pool.acquire() as conn:
        rec = await store.fetch_auth_record(conn, "AAAAAAAAAAAA")
        assert rec is not None
        assert (rec.owner_name, rec.groups, rec.creator, rec.name) == ("bob", ("finance",), "cli:root", "ci")
        assert "argon2" not in repr(rec)
        assert await store.fetch_auth_record(conn, "BBBBBBBBBBBB") is None
