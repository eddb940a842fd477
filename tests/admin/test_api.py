"""The admin API's contract: JSON errors, body limits, credential auth for scripts, credentials, usage, paging."""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from gateway.core import store
from gateway.core.settings import Settings
from gateway.core.store import Pool
from tests.admin.world import World, build_world, world

__all__ = ["world"]

ERROR_KEYS = {"error", "message", "fields"}


def assert_error(reply: Any, status: int, code: str | None = None) -> None:
    assert reply.status == status, reply.text
    assert set(reply.body) == ERROR_KEYS, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    if code is not None:
        assert reply.body["error"] == code


# --- errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\"text\"", b"{\"kind\": NaN}", b"\xff\xfe", b"[" * 100_000])
async def test_malformed_json_is_400_never_422(world: World, raw: bytes) -> None:
    reply = await world.call("POST", "/api/v1/credentials", "alice", data=raw,
                             headers={"Content-Type": "application/json"})
    assert_error(reply, 400, "invalid_json")


async def test_invalid_fields_are_400_with_a_message_per_field(world: World) -> None:
    reply = await world.call("POST", "/api/v1/credentials", "alice",
                             {"kind": "password", "name": 5, "expires_at": "tomorrow", "colour": "red"})
    assert_error(reply, 400, "invalid_request")
    assert set(reply.body["fields"]) == {"kind", "name", "expires_at", "colour"}


async def test_body_over_the_limit_is_413(settings: Settings, pool: Pool, aiohttp_client: AiohttpClient) -> None:
    small = dataclasses.replace(settings, admin=dataclasses.replace(settings.admin, max_body_bytes=1000))
    w = await build_world(small, pool, aiohttp_client)
    big = {"kind": "token", "name": "x" * 2000}
    assert_error(await w.call("POST", "/api/v1/credentials", "alice", big), 413, "payload_too_large")

    async def chunked() -> Any:  # no Content-Length: the reader stops at the limit
        yield b'{"kind": "token", "name": "'
        for _ in range(10):
            yield b"y" * 200
        yield b'"}'

    async with w.client.post("/api/v1/credentials", data=chunked(), headers=w.bearer("alice")) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "payload_too_large"


async def test_unknown_route_and_method_are_json(world: World) -> None:
    assert_error(await world.call("GET", "/api/v1/nothing-here", "root"), 404, "not_found")
    page = await world.call("GET", "/nothing")  # outside /api/v1 is the web UI: its 404 is a page
    assert page.status == 404 and page.headers["Content-Type"].startswith("text/html")
    reply = await world.call("PUT", "/api/v1/credentials", "root")
    assert_error(reply, 405, "method_not_allowed")
    assert "POST" in reply.headers["Allow"]


async def test_every_response_has_a_request_id_and_no_store(world: World) -> None:
    reply = await world.call("GET", "/api/v1/session", "alice", headers={"X-Request-Id": "trace-123"})
    assert reply.headers["X-Request-Id"] == "trace-123"
    assert reply.headers["Cache-Control"] == "no-store"
    generated = await world.call("GET", "/api/v1/session", "alice", headers={"X-Request-Id": "bad id\u00e9"})
    assert generated.headers["X-Request-Id"] != "bad id\u00e9" and len(generated.headers["X-Request-Id"]) == 32


async def test_a_bug_is_a_500_without_a_traceback(world: World, caplog: pytest.LogCaptureFixture) -> None:
    async with world.pool.acquire() as conn:  # a broken schema makes every session lookup fail
        await conn.execute("ALTER TABLE admin_sessions RENAME TO admin_sessions_gone")
    reply = await world.call("GET", "/api/v1/session", headers={"Cookie": "credgate_session=abc"})
    assert_error(reply, 500, "internal_error")
    assert "Traceback" not in reply.text and "admin_sessions" not in reply.text
    logged = [r.getMessage() for r in caplog.records if r.name == "admin.app" and r.levelname == "ERROR"]
    assert len(logged) == 1 and reply.headers["X-Request-Id"] in logged[0]
    # the server log has the frames and the error class, but not the database's text (it may quote rows)
    assert "UndefinedTableError" in logged[0] and "in _from_session" in logged[0]
    assert "does not exist" not in logged[0]


# --- credentials as script authentication -----------------------------------------------------------------

async def test_key_pair_authenticates_by_basic_and_by_headers(world: World) -> None:
    key = await world.credential("alice", kind="key")
    basic = base64.b64encode(f"{key.client_id}:{key.secret}".encode()).decode()
    reply = await world.call("GET", "/api/v1/session", headers={"Authorization": f"Basic {basic}"})
    assert reply.status == 200 and reply.body["auth_method"] == "basic"
    assert reply.body["credential_id"] == key.credential["id"]
    reply = await world.call("GET", "/api/v1/session",
                             headers={"accessKey": str(key.client_id), "secretKey": str(key.secret)})
    assert reply.status == 200 and reply.body["auth_method"] == "headers"


async def test_unknown_wrong_malformed_and_revoked_credentials_get_the_same_401(world: World) -> None:
    issued = await world.credential("alice")
    token = str(issued.token)
    wrong = token[:16] + ("A" if token[16] != "A" else "B") + token[17:]
    from gateway.core.formats import generate_token, new_public_id
    unknown = generate_token(new_public_id())
    await world.call("DELETE", f"/api/v1/credentials/{issued.credential['id']}", "root")
    bodies = set()
    for presented in (unknown, wrong, "not-a-token", token):
        reply = await world.call("GET", "/api/v1/session", headers={"Authorization": f"Bearer {presented}"})
        assert_error(reply, 401, "unauthorized")
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        bodies.add(reply.text)
    assert len(bodies) == 1


async def test_expired_and_suspended_credentials_get_401(world: World) -> None:
    expiring = await world.credential("alice")
    async with world.pool.acquire() as conn:
        await conn.execute("UPDATE credentials SET expires_at = now() - interval '1 second' WHERE public_id = $1",
                           expiring.credential["id"])
    reply = await world.call("GET", "/api/v1/session", headers={"Authorization": f"Bearer {expiring.token}"})
    assert_error(reply, 401)
    assert (await world.call("POST", "/api/v1/users/alice/disable", "root")).status == 200
    assert_error(await world.call("GET", "/api/v1/session", "alice"), 401)
    reply = await world.call("GET", f"/api/v1/credentials/{expiring.credential['id']}", "root")
    assert reply.body["status"] == "expired"
    assert (await world.call("POST", "/api/v1/users/alice/enable", "root")).status == 200
    assert (await world.call("GET", "/api/v1/session", "alice")).status == 200


async def test_two_credentials_at_once_are_400(world: World) -> None:
    key = await world.credential("alice", kind="key")
    reply = await world.call("GET", "/api/v1/session", "alice",
                             headers={"accessKey": str(key.client_id), "secretKey": str(key.secret)})
    assert_error(reply, 400)


# --- credentials --------------------------------------------------------------------------------------------

async def test_create_defaults_to_the_policy_lifetime_and_refuses_past_the_maximum(world: World) -> None:
    reply = await world.call("POST", "/api/v1/credentials", "alice", {"kind": "token", "name": "ci"})
    assert reply.status == 201 and reply.body["owner"] == "alice" and reply.body["status"] == "valid"
    expires = datetime.fromisoformat(reply.body["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=90))) < timedelta(minutes=1)
    too_long = await world.call("POST", "/api/v1/credentials", "alice", {"kind": "token", "expires_in_days": 400})
    assert_error(too_long, 400, "policy_violation")
    assert "365" in too_long.body["message"] and "expires_in_days" in too_long.body["fields"]
    never = await world.call("POST", "/api/v1/credentials", "alice", {"kind": "key", "expires_in_days": "never"})
    assert_error(never, 400, "policy_violation")


async def test_key_pair_is_shown_once_with_client_id(world: World) -> None:
    reply = await world.call("POST", "/api/v1/credentials", "alice", {"kind": "key"})
    assert reply.status == 201 and reply.body["client_id"].startswith("cgk_") and reply.body["secret"]
    shown = await world.call("GET", f"/api/v1/credentials/{reply.body['id']}", "alice")
    assert "secret" not in shown.body and shown.body["client_id"] == reply.body["client_id"]


async def test_revoked_stays_listed_as_revoked(world: World) -> None:
    issued = await world.credential("alice")
    ident = issued.credential["id"]
    assert (await world.call("DELETE", f"/api/v1/credentials/{ident}", "alice")).status == 204
    assert (await world.call("DELETE", f"/api/v1/credentials/{ident}", "alice")).status == 204
    listed = await world.call("GET", "/api/v1/credentials?status=revoked", "alice")
    assert [c["id"] for c in listed.body["items"]] == [ident]
    assert listed.body["items"][0]["revoked_at"] is not None
    assert_error(await world.call("PATCH", f"/api/v1/credentials/{ident}", "alice", {"name": "x"}), 409)
    assert_error(await world.call("POST", f"/api/v1/credentials/{ident}/rotate", "alice", {}), 409)


async def test_patch_changes_name_and_expiry(world: World) -> None:
    issued = await world.credential("alice")
    reply = await world.call("PATCH", f"/api/v1/credentials/{issued.credential['id']}", "alice",
                             {"name": "renamed", "expires_in_days": 5})
    assert reply.status == 200 and reply.body["name"] == "renamed"
    assert datetime.fromisoformat(reply.body["expires_at"]) < datetime.now(UTC) + timedelta(days=6)


async def test_list_filters_and_pagination(world: World) -> None:
    for _ in range(4):
        await world.credential("bob")
    key = await world.credential("bob", kind="key")
    seen: list[str] = []
    cursor = None
    while True:
        path = "/api/v1/credentials?owner=bob&limit=2" + (f"&cursor={cursor}" if cursor else "")
        reply = await world.call("GET", path, "root")
        assert reply.status == 200 and len(reply.body["items"]) <= 2
        seen += [c["id"] for c in reply.body["items"]]
        cursor = reply.body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 6 == len(set(seen))  # five made here plus bob's script token
    keys = await world.call("GET", "/api/v1/credentials?owner=bob&kind=key", "root")
    assert [c["id"] for c in keys.body["items"]] == [key.credential["id"]]
    soon = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    none_soon = await world.call("GET", f"/api/v1/credentials?expiring_before={soon.replace('+', '%2B')}", "root")
    assert none_soon.body["items"] == []
    assert_error(await world.call("GET", "/api/v1/credentials?limit=0", "root"), 400)
    assert_error(await world.call("GET", "/api/v1/credentials?cursor=abc", "root"), 400)
    assert_error(await world.call("GET", "/api/v1/credentials?status=gone", "root"), 400)
    nobody = await world.call("GET", "/api/v1/credentials?owner=nobody", "root")
    assert nobody.status == 200 and nobody.body == {"items": [], "next_cursor": None}


async def test_usage_reads_the_gateway_counters(world: World) -> None:
    issued = await world.credential("alice")
    async with world.pool.acquire() as conn:
        internal_id = await conn.fetchval("SELECT id FROM credentials WHERE public_id = $1", issued.credential["id"])
        today = datetime.now(UTC).date()
        used_at = datetime.now(UTC).replace(microsecond=0)
        await store.write_usage(conn, {(internal_id, today): 7, (internal_id, today - timedelta(days=1)): 3},
                                {internal_id: used_at})
    reply = await world.call("GET", f"/api/v1/credentials/{issued.credential['id']}/usage?days=7", "alice")
    assert reply.status == 200
    assert reply.body["total_requests"] == 10
    assert reply.body["days"] == [{"day": (today - timedelta(days=1)).isoformat(), "requests": 3},
                                  {"day": today.isoformat(), "requests": 7}]
    assert datetime.fromisoformat(reply.body["last_used_at"]) == used_at
    assert date.fromisoformat(reply.body["since"]) == today - timedelta(days=6)


# --- users and groups ---------------------------------------------------------------------------------------

async def test_user_lifecycle_through_the_api(world: World) -> None:
    created = await world.call("POST", "/api/v1/users", "root", {"name": "carol", "groups": []})
    assert created.status == 201 and len(created.body["password"]) >= 16
    service = await world.call("POST", "/api/v1/users", "root", {"name": "robot", "kind": "service"})
    assert service.status == 201 and "password" not in service.body
    assert_error(await world.call("POST", "/api/v1/users", "root",
                                  {"name": "robot2", "kind": "service", "password": "x" * 20}), 400)
    assert_error(await world.call("POST", "/api/v1/users", "root", {"name": "carol"}), 409)
    assert_error(await world.call("POST", "/api/v1/users/robot/password", "root"), 400)
    reset = await world.call("POST", "/api/v1/users/carol/password", "root")
    assert reset.status == 200 and reset.body["password"] != created.body["password"]
    await world.login("carol", reset.body["password"])
    listed = await world.call("GET", "/api/v1/users?kind=service", "root")
    assert {u["name"] for u in listed.body["items"]} == {"svc", "robot"}
    carol_token = await world.credential("carol")
    assert (await world.call("DELETE", "/api/v1/users/carol", "root")).status == 204
    assert_error(await world.call("GET", "/api/v1/users/carol", "root"), 404)
    shown = await world.call("GET", f"/api/v1/credentials/{carol_token.credential['id']}", "root")
    assert shown.body["status"] == "revoked"


async def test_group_lifecycle_through_the_api(world: World) -> None:
    assert (await world.call("POST", "/api/v1/groups", "root", {"name": "finance", "description": "$"})).status == 201
    assert (await world.call("PUT", "/api/v1/groups/finance/members/alice", "root")).status == 204
    assert (await world.call("PUT", "/api/v1/groups/finance/members/alice", "root")).status == 204
    shown = await world.call("GET", "/api/v1/groups/finance", "root")
    assert shown.body["members"] == ["alice"]
    me = await world.call("GET", "/api/v1/session", "alice")
    assert me.body["user"]["groups"] == ["finance"]
    assert_error(await world.call("PUT", "/api/v1/groups/finance/members/nobody", "root"), 404)
    assert (await world.call("DELETE", "/api/v1/groups/finance/members/alice", "root")).status == 204
    for name in ("b-group", "c-group"):
        await world.group(name)
    first = await world.call("GET", "/api/v1/groups?limit=2", "root")
    assert [g["name"] for g in first.body["items"]] == ["b-group", "c-group"]
    second = await world.call("GET", f"/api/v1/groups?limit=2&cursor={first.body['next_cursor']}", "root")
    assert [g["name"] for g in second.body["items"]] == ["finance"] and second.body["next_cursor"] is None
    assert (await world.call("DELETE", "/api/v1/groups/finance", "root")).status == 204
    assert_error(await world.call("GET", "/api/v1/groups/finance", "root"), 404)
