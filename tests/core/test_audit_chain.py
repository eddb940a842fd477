"""The audit hash chain: every writer is chained, superuser tampering is named at its row, concurrency, export."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway.core import audit_chain, database, store
from gateway.core.audit_chain import ChainPoint

# Two ways a superuser writes past the append-only and chain triggers (each: switch off, switch on).
BYPASSES = {
    "replication role": ("SET session_replication_role = replica", "SET session_replication_role = DEFAULT"),
    "triggers disabled": ("ALTER TABLE audit_events DISABLE TRIGGER ALL",
                          "ALTER TABLE audit_events ENABLE TRIGGER ALL"),
}


async def write_events(pool: Any, count: int, actor: str = "cli:test") -> list[int]:
    """`count` audit events through store.write_audit; their ids in chain order."""
    for i in range(count):
        async with pool.acquire() as conn, conn.transaction():
            await store.write_audit(conn, store.Actor(actor, auth_method="cli"), "thing.update", "thing", f"t{i}",
                                    {"n": i, "note": "é ünïcode", "nested": {"b": [1, 2.5, None], "a": True}})
    return [r["id"] for r in await pool.fetch("SELECT id FROM audit_events ORDER BY chain_seq")]


async def tamper(database_url: str, bypass: str, *statements: str) -> None:
    """Run `statements` as the superuser with the triggers out of the way."""
    off, on = BYPASSES[bypass]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(off)
        for sql in statements:
            await conn.execute(sql)
        await conn.execute(on)
    finally:
        await conn.close()


async def test_every_insert_is_linked_to_the_previous_one(pool: Any) -> None:
    ids = await write_events(pool, 4)
    rows = await pool.fetch("SELECT chain_seq, prev_hash, row_hash FROM audit_events ORDER BY chain_seq")
    assert [r["chain_seq"] for r in rows] == list(range(1, len(ids) + 1))
    assert bytes(rows[0]["prev_hash"]) == audit_chain.GENESIS
    for before, after in itertools.pairwise(rows):
        assert after["prev_hash"] == before["row_hash"]
    head = await pool.fetchrow(audit_chain.CHAIN_HEAD)
    assert (head["seq"], head["hash"]) == (len(ids), rows[-1]["row_hash"])
    report = await audit_chain.verify(pool)
    assert report.ok and report.checked == len(ids) and report.last == ChainPoint(len(ids), bytes(head["hash"]))


async def test_the_hash_is_sha256_over_prev_hash_and_canonical_json(pool: Any) -> None:
    await write_events(pool, 1)
    row = await pool.fetchrow(
        "SELECT prev_hash, row_hash, credgate_audit_canonical(chain_seq, id, at, actor, actor_id, auth_method, "
        "action, target_type, target, changes, request_id, source) AS canonical FROM audit_events")
    assert row["row_hash"] == hashlib.sha256(row["prev_hash"] + row["canonical"].encode()).digest()
    assert row["canonical"].startswith('{"at": "') and '"seq": 1' in row["canonical"]
    # the session's time zone does not change the text
    async with pool.acquire() as conn:
        await conn.execute("SET TimeZone = 'Asia/Kolkata'")
        try:
            assert (await audit_chain.verify(conn)).ok
        finally:
            await conn.execute("RESET TimeZone")


async def test_the_head_moves_only_with_an_insert(pool: Any) -> None:
    await write_events(pool, 1)
    for sql in ("UPDATE audit_chain_head SET seq = 0", "DELETE FROM audit_chain_head", "TRUNCATE audit_chain_head"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await pool.execute(sql)
    forged = await pool.fetchrow("INSERT INTO audit_events (actor, action, target_type, target, chain_seq, row_hash) "
                                 "VALUES ('x', 'y', 'z', 'w', 99, '\\x00') RETURNING chain_seq, row_hash")
    assert forged["chain_seq"] == 2 and len(forged["row_hash"]) == 32  # the trigger sets them, whatever was sent
    assert (await audit_chain.verify(pool)).ok


@pytest.mark.parametrize("bypass", sorted(BYPASSES))
@pytest.mark.parametrize("change", [
    "actor = 'cli:someone-else'",
    "changes = changes || '{\"n\": 99}'",
    "at = at - interval '1 microsecond'",
    "actor_id = 1",
    "id = id + 1000",
])
async def test_an_altered_row_is_reported_at_exactly_that_row(
        pool: Any, database_url: str, bypass: str, change: str) -> None:
    ids = await write_events(pool, 6)
    await tamper(database_url, bypass, f"UPDATE audit_events SET {change} WHERE chain_seq = 3")
    report = await audit_chain.verify(pool)
    assert report.broken is not None and report.checked == 2
    expected_id = ids[2] + 1000 if change.startswith("id =") else ids[2]
    assert (report.broken.id, report.broken.chain_seq) == (expected_id, 3)
    assert "content does not match its hash" in report.broken.reason
    assert report.last.seq == 2


@pytest.mark.parametrize("bypass", sorted(BYPASSES))
async def test_a_deleted_row_is_reported_at_the_row_after_it(pool: Any, database_url: str, bypass: str) -> None:
    ids = await write_events(pool, 6)
    await tamper(database_url, bypass, "DELETE FROM audit_events WHERE chain_seq IN (3, 4)")
    broken = (await audit_chain.verify(pool)).broken
    assert broken is not None and (broken.id, broken.chain_seq) == (ids[4], 5)
    assert "position(s) 3 to 4 before it are missing" in broken.reason


async def test_deleting_the_newest_rows_is_reported_against_the_head(pool: Any, database_url: str) -> None:
    await write_events(pool, 5)
    await tamper(database_url, "triggers disabled", "DELETE FROM audit_events WHERE chain_seq = 5")
    broken = (await audit_chain.verify(pool)).broken
    assert broken is not None and (broken.id, broken.chain_seq) == (None, 5)
    assert "newest rows were deleted" in broken.reason
    assert broken.describe().startswith("audit chain broken at the end of the chain (chain position 5)")


async def test_renumbering_after_a_delete_breaks_the_link(pool: Any, database_url: str) -> None:
    ids = await write_events(pool, 5)
    await tamper(database_url, "replication role", "DELETE FROM audit_events WHERE chain_seq = 2",
                 "UPDATE audit_events SET chain_seq = 1 - chain_seq WHERE chain_seq > 2",  # via < 0: unique index
                 "UPDATE audit_events SET chain_seq = -chain_seq WHERE chain_seq < 0",
                 "UPDATE audit_chain_head SET seq = 4")
    broken = (await audit_chain.verify(pool)).broken
    assert broken is not None and (broken.id, broken.chain_seq) == (ids[2], 2)
    assert "prev_hash is not the previous row's hash" in broken.reason


async def test_reordered_rows_are_reported_at_the_first_moved_row(pool: Any, database_url: str) -> None:
    ids = await write_events(pool, 5)
    await tamper(database_url, "replication role",
                 "UPDATE audit_events SET chain_seq = -1 WHERE chain_seq = 2",
                 "UPDATE audit_events SET chain_seq = 2 WHERE chain_seq = 3",
                 "UPDATE audit_events SET chain_seq = 3 WHERE chain_seq = -1")
    broken = (await audit_chain.verify(pool)).broken
    assert broken is not None and (broken.id, broken.chain_seq) == (ids[2], 2)


async def test_a_forged_hash_is_reported(pool: Any, database_url: str) -> None:
    ids = await write_events(pool, 5)
    await tamper(database_url, "replication role",
                 "UPDATE audit_events SET row_hash = sha256('forged') WHERE chain_seq = 3")
    broken = (await audit_chain.verify(pool)).broken
    assert broken is not None and (broken.id, broken.chain_seq) == (ids[2], 3)


async def test_a_row_rewritten_with_a_recomputed_hash_breaks_the_next_link(pool: Any, database_url: str) -> None:
    ids = await write_events(pool, 5)
    await tamper(database_url, "replication role",
                 "UPDATE audit_events SET actor = 'cli:innocent' WHERE chain_seq = 3",
                 "UPDATE audit_events SET row_hash = credgate_audit_link(prev_hash, credgate_audit_canonical("
                 "chain_seq, id, at, actor, actor_id, auth_method, action, target_type, target, changes, "
                 "request_id, source)) WHERE chain_seq = 3")
    broken = (await audit_chain.verify(pool)).broken
    assert broken is not None and (broken.id, broken.chain_seq) == (ids[3], 4)
    assert "prev_hash" in broken.reason


async def test_a_forged_head_is_reported(pool: Any, database_url: str) -> None:
    await write_events(pool, 3)
    await tamper(database_url, "replication role", "UPDATE audit_chain_head SET hash = sha256('x')")
    broken = (await audit_chain.verify(pool)).broken
    assert broken is not None and broken.id is None and "head's hash" in broken.reason


async def test_concurrent_writers_leave_one_valid_chain(database_url: str) -> None:
    pool = await database.create_pool(database_url, min_size=1, max_size=50)
    try:
        async def writer(n: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                for i in range(3):
                    await store.write_audit(conn, store.Actor(f"cli:w{n}"), "thing.update", "thing", f"{n}/{i}")
                    await asyncio.sleep(random.random() / 100)
                if n % 10 == 0:  # a rolled-back writer leaves no gap in the chain
                    raise asyncio.CancelledError

        results = await asyncio.gather(*(writer(n) for n in range(50)), return_exceptions=True)
        assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 5
        rows = await pool.fetch("SELECT chain_seq FROM audit_events ORDER BY chain_seq")
        assert [r["chain_seq"] for r in rows] == list(range(1, 45 * 3 + 1))
        report = await audit_chain.verify(pool, batch=7)  # several batches
        assert report.ok and report.checked == 135
    finally:
        await pool.close()


async def test_incremental_verify_checks_only_new_rows_and_its_starting_link(pool: Any, database_url: str) -> None:
    await write_events(pool, 3)
    first = await audit_chain.verify(pool)
    await write_events(pool, 2)
    second = await audit_chain.verify(pool, first.last)
    assert second.ok and second.checked == 2 and second.last.seq == 5
    assert (await audit_chain.verify(pool, second.last)).checked == 0
    await tamper(database_url, "replication role", "UPDATE audit_events SET actor = 'x' WHERE chain_seq = 1")
    assert (await audit_chain.verify(pool, second.last)).ok  # not rechecked: the periodic full walk finds it
    assert not (await audit_chain.verify(pool)).ok
    await tamper(database_url, "replication role", "UPDATE audit_events SET row_hash = sha256('x') WHERE chain_seq = 5")
    broken = (await audit_chain.verify(pool, second.last)).broken
    assert broken is not None and broken.chain_seq == 5 and "changed since it was verified" in broken.reason


async def test_migration_chains_the_rows_written_before_it(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(store.CREATE_MIGRATIONS_TABLE)
        for version, sql in store.migration_files():
            if version >= "006":
                break
            await conn.execute(sql)
            await conn.execute(store.RECORD_MIGRATION, version)
        for i in range(4):
            await conn.execute(store.INSERT_AUDIT, "cli:old", None, "", "old.action", "thing", f"o{i}",
                               f'{{"i": {i}}}', "", "")
        assert "006_audit_chain" in await store.migrate(conn)
        report = await audit_chain.verify(conn)
        assert report.ok and report.checked == 4
        await conn.execute(store.INSERT_AUDIT, "cli:new", None, "", "new.action", "thing", "n", "{}", "", "")
        assert (await conn.fetchval("SELECT chain_seq FROM audit_events WHERE actor = 'cli:new'")) == 5
        assert (await audit_chain.verify(conn)).ok
    finally:
        await conn.close()


async def test_export_is_chain_ordered_json_between_since_and_until(pool: Any) -> None:
    await write_events(pool, 3)
    rows = await pool.fetch("SELECT id, at FROM audit_events ORDER BY chain_seq")
    everything = [e async for e in audit_chain.export(pool, datetime(2000, 1, 1, tzinfo=UTC), batch=2)]
    assert [e["id"] for e in everything] == [r["id"] for r in rows]
    first = everything[0]
    assert list(first) == ["id", "chain_seq", "at", "actor", "actor_id", "auth_method", "action", "target_type",
                           "target", "changes", "request_id", "source", "prev_hash", "hash"]
    assert first["changes"]["nested"] == {"a": True, "b": [1, 2.5, None]}
    assert first["at"].endswith("Z") and first["prev_hash"] == "00" * 32 and everything[1]["prev_hash"] == first["hash"]
    window = [e async for e in audit_chain.export(pool, rows[1]["at"], rows[2]["at"])]
    assert [e["id"] for e in window] == [rows[1]["id"]]
    later = rows[2]["at"] + timedelta(seconds=1)
    assert [e async for e in audit_chain.export(pool, later)] == []
