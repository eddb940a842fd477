"""Rotation through the admin API: grace periods, and Idempotency-Key so a retried rotate never rotates twice."""

from __future__ import annotations

import asyncio

from pytest_aiohttp import AiohttpClient

from admin.app import create_app
from gateway.core.settings import Settings
from gateway.core.store import Pool
from tests.admin.world import World, world

__all__ = ["world"]


async def rotations(world: World, public_id: str) -> int:
    async with world.pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM audit_events WHERE action = 'credential.rotate' AND target = $1", public_id)
    return count


async def test_a_retried_rotate_returns_the_same_secret_and_rotates_once(world: World) -> None:
    issued = await world.credential("alice")
    path = f"/api/v1/credentials/{issued.credential['id']}/rotate"
    first = await world.call("POST", path, "alice", {"grace_seconds": 0}, headers={"Idempotency-Key": "k-1"})
    again = await world.call("POST", path, "alice", {"grace_seconds": 0}, headers={"Idempotency-Key": "k-1"})
    assert first.status == again.status == 200
    assert again.body == first.body and first.body["token"] != issued.token
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    assert await rotations(world, issued.credential["id"]) == 1
    new = await world.call("GET", "/api/v1/session", headers={"Authorization": f"Bearer {first.body['token']}"})
    assert new.status == 200
    # without a key every call rotates
    third = await world.call("POST", path, "alice", {})
    assert third.status == 200 and third.body["token"] != first.body["token"]
    assert await rotations(world, issued.credential["id"]) == 2


async def test_concurrent_retries_rotate_once(world: World) -> None:
    issued = await world.credential("alice", kind="key")
    path = f"/api/v1/credentials/{issued.credential['id']}/rotate"
    replies = await asyncio.gather(*(world.call("POST", path, "alice", {}, headers={"Idempotency-Key": "same"})
                                     for _ in range(4)))
    assert {r.status for r in replies} == {200}
    assert len({r.body["secret"] for r in replies}) == 1
    assert await rotations(world, issued.credential["id"]) == 1


async def test_a_key_reused_for_another_request_is_409(world: World) -> None:
    one, two = await world.credential("alice"), await world.credential("alice")
    headers = {"Idempotency-Key": "k-2"}
    assert (await world.call("POST", f"/api/v1/credentials/{one.credential['id']}/rotate", "alice", {},
                             headers=headers)).status == 200
    other_grace = await world.call("POST", f"/api/v1/credentials/{one.credential['id']}/rotate", "alice",
                                   {"grace_seconds": 60}, headers=headers)
    assert other_grace.status == 409 and other_grace.body["error"] == "idempotency_mismatch"
    other_credential = await world.call("POST", f"/api/v1/credentials/{two.credential['id']}/rotate", "alice", {},
                                        headers=headers)
    assert other_credential.status == 409
    assert await rotations(world, two.credential["id"]) == 0


async def test_keys_are_per_caller(world: World) -> None:
    mine, theirs = await world.credential("alice"), await world.credential("bob")
    headers = {"Idempotency-Key": "shared-name"}
    a = await world.call("POST", f"/api/v1/credentials/{mine.credential['id']}/rotate", "alice", {}, headers=headers)
    b = await world.call("POST", f"/api/v1/credentials/{theirs.credential['id']}/rotate", "bob", {}, headers=headers)
    assert a.status == b.status == 200 and a.body["id"] != b.body["id"]


async def test_after_a_restart_a_retry_is_refused_not_repeated(world: World, settings: Settings, pool: Pool,
                                                             aiohttp_client: AiohttpClient) -> None:
    issued = await world.credential("alice")
    path = f"/api/v1/credentials/{issued.credential['id']}/rotate"
    first = await world.call("POST", path, "alice", {}, headers={"Idempotency-Key": "k-3"})
    assert first.status == 200
    restarted = await aiohttp_client(create_app(settings))  # a fresh process: the response is not in memory
    async with restarted.post(path, json={}, headers={"Idempotency-Key": "k-3", **world.bearer("alice")}) as resp:
        body = await resp.json()
        assert resp.status == 409 and body["error"] == "already_rotated"
        assert first.body["token"] not in await resp.text()
    assert await rotations(world, issued.credential["id"]) == 1


async def test_a_failed_rotation_frees_its_key(world: World) -> None:
    revoked, valid = await world.credential("alice"), await world.credential("alice")
    await world.call("DELETE", f"/api/v1/credentials/{revoked.credential['id']}", "alice")
    headers = {"Idempotency-Key": "k-4"}
    failed = await world.call("POST", f"/api/v1/credentials/{revoked.credential['id']}/rotate", "alice", {},
                              headers=headers)
    assert failed.status == 409 and failed.body["error"] == "conflict"
    ok = await world.call("POST", f"/api/v1/credentials/{valid.credential['id']}/rotate", "alice", {},
                          headers=headers)
    assert ok.status == 200


async def test_bad_idempotency_keys_are_400(world: World) -> None:
    issued = await world.credential("alice")
    reply = await world.call("POST", f"/api/v1/credentials/{issued.credential['id']}/rotate", "alice", {},
                             headers={"Idempotency-Key": "x" * 300})
    assert reply.status == 400 and "Idempotency-Key" in reply.body["fields"]


async def test_grace_keeps_the_old_secret_working_until_the_deadline(world: World) -> None:
    """Seen from the admin API's own credential auth (the gateway side is in test_admin_gateway)."""
    old_token = world.tokens["alice"]
    ident = (await world.call("GET", "/api/v1/session", "alice")).body["credential_id"]
    rotated = await world.call("POST", f"/api/v1/credentials/{ident}/rotate", "alice", {"grace_seconds": 1})
    assert rotated.status == 200 and rotated.body["previous_secret_expires_at"] is not None
    new = {"Authorization": f"Bearer {rotated.body['token']}"}
    old = {"Authorization": f"Bearer {old_token}"}
    assert (await world.call("GET", "/api/v1/session", headers=new)).status == 200
    assert (await world.call("GET", "/api/v1/session", headers=old)).status == 200
    await asyncio.sleep(1.3)
    assert (await world.call("GET", "/api/v1/session", headers=old)).status == 401
    assert (await world.call("GET", "/api/v1/session", headers=new)).status == 200


async def test_rotate_without_grace_stops_the_old_secret_at_once(world: World) -> None:
    old = {"Authorization": f"Bearer {world.tokens['bob']}"}
    ident = (await world.call("GET", "/api/v1/session", "bob")).body["credential_id"]
    assert (await world.call("POST", f"/api/v1/credentials/{ident}/rotate", "bob")).status == 200
    assert (await world.call("GET", "/api/v1/session", headers=old)).status == 401
