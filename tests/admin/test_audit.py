"""The audit trail: who, how, which request and from where; filters and paging; append-only in the database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.admin.world import World, world

__all__ = ["world"]


async def test_each_change_records_actor_method_request_and_source(world: World) -> None:
    reply = await world.call("POST", "/api/v1/credentials", "alice", {"kind": "token", "name": "ci"},
                             headers={"X-Request-Id": "req-42"})
    ident = reply.body["id"]
    _, csrf = await world.login("alice")
    world_cookie_patch = await world.call("PATCH", f"/api/v1/credentials/{ident}", body={"name": "ci-2"},
                                          headers={"X-CSRF-Token": csrf, "X-Request-Id": "req-43"})
    assert world_cookie_patch.status == 200
    events = await world.call("GET", f"/api/v1/audit?target={ident}", "root")
    assert events.status == 200
    update, create = events.body["items"]  # newest first
    assert create["action"] == "credential.create" and create["actor"] == "alice"
    assert create["auth_method"] == "bearer" and create["request_id"] == "req-42"
    assert create["source"] == "127.0.0.1" and isinstance(create["actor_id"], int)
    assert update["action"] == "credential.update" and update["auth_method"] == "session"
    assert update["request_id"] == "req-43"
    assert update["changes"] == {"name": {"before": "ci", "after": "ci-2"}}


async def test_filters_and_paging(world: World) -> None:
    for name in ("g1", "g2", "g3"):
        assert (await world.call("POST", "/api/v1/groups", "root", {"name": name})).status == 201
    only = await world.call("GET", "/api/v1/audit?action=group.create&actor=root&limit=2", "root")
    assert [e["target"] for e in only.body["items"]] == ["g3", "g2"]
    rest = await world.call("GET", f"/api/v1/audit?action=group.create&actor=root&limit=2"
                                   f"&cursor={only.body['next_cursor']}", "root")
    assert [e["target"] for e in rest.body["items"]] == ["g1"] and rest.body["next_cursor"] is None
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (await world.call("GET", f"/api/v1/audit?since={future}", "root")).body["items"] == []
    assert len((await world.call("GET", f"/api/v1/audit?until={future}&limit=500", "root")).body["items"]) > 3
    assert (await world.call("GET", "/api/v1/audit?since=yesterday", "root")).status == 400


@pytest.mark.parametrize("statement", [
    "UPDATE audit_events SET actor = 'someone-else'",
    "DELETE FROM audit_events",
    "TRUNCATE audit_events",
])
async def test_audit_rows_cannot_be_changed_or_removed_through_sql(world: World, statement: str) -> None:
    async with world.pool.acquire() as conn:
        before = await conn.fetch("SELECT * FROM audit_events ORDER BY id")
        assert before, "the fixtures wrote audit events"
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(statement)
        assert await conn.fetch("SELECT * FROM audit_events ORDER BY id") == before
