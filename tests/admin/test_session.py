"""Interactive login: the cookie, CSRF, logout, the same 401 for every wrong login, throttling, passwords."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from pytest_aiohttp import AiohttpClient

from gateway.core.settings import Settings
from gateway.core.store import Pool
from tests.admin.world import PASSWORDS, World, build_world, world

__all__ = ["world"]


def with_admin(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, admin=dataclasses.replace(settings.admin, **changes))


def cookie_header(value: str) -> dict[str, str]:
    return {"Cookie": f"credgate_session={value}"}


async def test_login_sets_a_strict_http_only_cookie_and_stores_only_its_hash(world: World) -> None:
    reply = await world.call("POST", "/api/v1/session", body={"username": "alice", "password": PASSWORDS["alice"]})
    assert reply.status == 200
    assert reply.body["user"]["name"] == "alice" and reply.body["auth_method"] == "session"
    assert len(reply.body["csrf_token"]) == 64
    set_cookie = reply.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/api/" in set_cookie
    assert "Secure" not in set_cookie  # plain HTTP here; Secure is set when the request came over TLS
    value = set_cookie.split(";")[0].split("=", 1)[1]
    async with world.pool.acquire() as conn:
        rows = await conn.fetch("SELECT id_hash::text AS h, source FROM admin_sessions")
    assert len(rows) == 1 and value not in rows[0]["h"] and value.encode().hex() not in rows[0]["h"]
    assert rows[0]["source"] == "127.0.0.1"


async def test_state_changing_calls_with_the_cookie_need_the_csrf_token(world: World) -> None:
    _, csrf = await world.login("alice")
    assert (await world.call("GET", "/api/v1/credentials")).status == 200  # reads need no token
    body = {"kind": "token"}
    missing = await world.call("POST", "/api/v1/credentials", body=body)
    assert missing.status == 403 and missing.body["error"] == "csrf_failed"
    wrong = await world.call("POST", "/api/v1/credentials", body=body, headers={"X-CSRF-Token": "0" * 64})
    assert wrong.status == 403
    other_cookie_token = await world.call("POST", "/api/v1/credentials", body=body,
                                          headers={"X-CSRF-Token": csrf[:-1] + ("0" if csrf[-1] != "0" else "1")})
    assert other_cookie_token.status == 403
    ok = await world.call("POST", "/api/v1/credentials", body=body, headers={"X-CSRF-Token": csrf})
    assert ok.status == 201 and ok.body["owner"] == "alice"
    assert (await world.call("DELETE", "/api/v1/session")).status == 403  # logout is a change too


async def test_logout_ends_the_session_server_side(world: World) -> None:
    cookie, csrf = await world.login("alice")
    reply = await world.call("DELETE", "/api/v1/session", headers={"X-CSRF-Token": csrf})
    assert reply.status == 204
    world.client.session.cookie_jar.clear()
    assert (await world.call("GET", "/api/v1/session", headers=cookie_header(cookie))).status == 401
    async with world.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM admin_sessions") == 0
        actions = [r[0] for r in await conn.fetch("SELECT action FROM audit_events WHERE target = 'alice'")]
    assert actions[-2:] == ["session.login", "session.logout"]


async def test_every_failed_login_gets_the_same_401(world: World) -> None:
    await world.principal("dora", password="dora-password-0123")
    await world.call("POST", "/api/v1/users/dora/disable", "root")
    attempts = [("nobody", "whatever-password"), ("alice", "wrong-password-0"), ("svc", "any-password-000"),
                ("dora", "dora-password-0123")]
    bodies = set()
    for username, password in attempts:
        reply = await world.call("POST", "/api/v1/session", body={"username": username, "password": password})
        assert reply.status == 401
        bodies.add(reply.text)
    assert len(bodies) == 1
    assert (await world.call("POST", "/api/v1/session", body={"username": "alice"})).status == 400


async def test_failed_logins_are_throttled_per_username(settings: Settings, pool: Pool,
                                                        aiohttp_client: AiohttpClient) -> None:
    w = await build_world(with_admin(settings, login_max_failures=3, login_window_seconds=60.0), pool, aiohttp_client)
    for _ in range(3):
        reply = await w.call("POST", "/api/v1/session", body={"username": "alice", "password": "wrong-password"})
        assert reply.status == 401
    blocked = await w.call("POST", "/api/v1/session", body={"username": "alice", "password": PASSWORDS["alice"]})
    assert blocked.status == 429 and blocked.body["error"] == "throttled"
    assert 0 < int(blocked.headers["Retry-After"]) <= 60
    # another user from the same address is not affected by alice's counter
    bob = await w.call("POST", "/api/v1/session", body={"username": "bob", "password": PASSWORDS["bob"]})
    assert bob.status == 200


async def test_failed_logins_are_throttled_per_address(settings: Settings, pool: Pool,
                                                       aiohttp_client: AiohttpClient) -> None:
    w = await build_world(with_admin(settings, login_max_failures=2, login_window_seconds=60.0), pool, aiohttp_client)
    for index in range(8):  # 4 x the per-user limit, spread over usernames that never reach their own limit
        reply = await w.call("POST", "/api/v1/session", body={"username": f"guess{index}", "password": "x"})
        assert reply.status == 401
    blocked = await w.call("POST", "/api/v1/session", body={"username": "bob", "password": PASSWORDS["bob"]})
    assert blocked.status == 429 and int(blocked.headers["Retry-After"]) > 0


async def test_the_throttle_forgets_after_its_window(settings: Settings, pool: Pool,
                                                     aiohttp_client: AiohttpClient) -> None:
    w = await build_world(with_admin(settings, login_max_failures=1, login_window_seconds=1.0), pool, aiohttp_client)
    await w.call("POST", "/api/v1/session", body={"username": "alice", "password": "wrong-password"})
    login = {"username": "alice", "password": PASSWORDS["alice"]}
    assert (await w.call("POST", "/api/v1/session", body=login)).status == 429
    await asyncio.sleep(1.2)
    assert (await w.call("POST", "/api/v1/session", body=login)).status == 200


async def test_sessions_expire(settings: Settings, pool: Pool, aiohttp_client: AiohttpClient) -> None:
    w = await build_world(with_admin(settings, session_ttl=1.0), pool, aiohttp_client)
    await w.login("alice")
    assert (await w.call("GET", "/api/v1/session")).status == 200
    await asyncio.sleep(1.2)
    assert (await w.call("GET", "/api/v1/session")).status == 401


async def test_a_disabled_users_session_stops_at_once(world: World) -> None:
    await world.login("alice")
    assert (await world.call("POST", "/api/v1/users/alice/disable", "root")).status == 200
    assert (await world.call("GET", "/api/v1/session")).status == 401


async def test_changing_your_password_ends_your_other_sessions(world: World) -> None:
    first, _ = await world.login("alice")
    second, csrf = await world.login("alice")
    change = {"current_password": "not-my-password", "new_password": "alice-new-password-1"}
    wrong = await world.call("PUT", "/api/v1/me/password", body=change, headers={"X-CSRF-Token": csrf})
    assert wrong.status == 400 and "current_password" in wrong.body["fields"]
    change["current_password"] = PASSWORDS["alice"]
    short = await world.call("PUT", "/api/v1/me/password", body={**change, "new_password": "short"},
                             headers={"X-CSRF-Token": csrf})
    assert short.status == 400 and "password" in short.body["fields"]
    assert (await world.call("PUT", "/api/v1/me/password", body=change, headers={"X-CSRF-Token": csrf})).status == 204
    world.client.session.cookie_jar.clear()
    assert (await world.call("GET", "/api/v1/session", headers=cookie_header(second))).status == 200
    assert (await world.call("GET", "/api/v1/session", headers=cookie_header(first))).status == 401
    await world.login("alice", "alice-new-password-1")


async def test_an_admin_password_reset_ends_the_users_sessions(world: World) -> None:
    cookie, _ = await world.login("alice")
    world.client.session.cookie_jar.clear()
    reset = await world.call("POST", "/api/v1/users/alice/password", "root")
    assert reset.status == 200
    assert (await world.call("GET", "/api/v1/session", headers=cookie_header(cookie))).status == 401
    await world.login("alice", reset.body["password"])


async def test_world_callers_authenticate(world: World) -> None:
    for who, admin in (("root", True), ("alice", False), ("svc", False)):
        reply = await world.call("GET", "/api/v1/session", who)
        assert reply.status == 200, reply.text
        assert reply.body["user"]["name"] == who
        assert reply.body["user"]["is_admin"] is admin
        assert reply.body["auth_method"] == "bearer"
