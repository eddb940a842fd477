"""Log in, see who you are, log out, change your own password."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admin import auth, lifecycle
from admin.auth import Identity, actor_for, current, source_address
from admin.errors import ApiError, json_response, no_content
from admin.views.common import Fields, read_json, services
from gateway.core import admin_sql
from gateway.core.store import Connection

MAX_PASSWORD_LENGTH = 1024


async def load_user(conn: Connection, principal_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(admin_sql.PRINCIPAL_BY_ID, principal_id)
    assert row is not None  # principals are never deleted from the table, only marked deleted
    groups = [r[0] for r in await conn.fetch(admin_sql.PRINCIPAL_GROUPS, principal_id)]
    return lifecycle.public_principal(row, groups)


async def session_body(request: web.Request, identity: Identity) -> dict[str, Any]:
    async with services(request).pool.acquire() as conn:
        user = await load_user(conn, identity.principal_id)
    return {"user": user, "auth_method": identity.method, "csrf_token": identity.csrf_token,
            "expires_at": identity.session_expires_at, "credential_id": identity.credential_id}


async def login(request: web.Request) -> web.Response:
    body = Fields(await read_json(request), ("username", "password"))
    username = body.string("username", required=True, max_length=128)
    password = body.string("password", required=True, max_length=MAX_PASSWORD_LENGTH)
    body.done()
    assert username is not None and password is not None
    svc = services(request)
    identity, token = await svc.auth.login(username, password, request[auth.REQUEST_ID], source_address(request))
    request[auth.IDENTITY] = identity  # for the access log line
    response = json_response(await session_body(request, identity))
    response.set_cookie(auth.SESSION_COOKIE, token, **auth.cookie_settings(request, svc.settings.admin.session_ttl))
    return response


async def show(request: web.Request) -> web.Response:
    return json_response(await session_body(request, current(request)))


async def logout(request: web.Request) -> web.Response:
    await services(request).auth.logout(current(request), actor_for(request))
    response = no_content()
    response.del_cookie(auth.SESSION_COOKIE, path="/api/")
    return response


async def change_password(request: web.Request) -> web.Response:
    """The caller's own password: the current one is required and wrong guesses count as failed logins."""
    identity = current(request)
    body = Fields(await read_json(request), ("current_password", "new_password"))
    old = body.string("current_password", required=True, max_length=MAX_PASSWORD_LENGTH)
    new = body.string("new_password", required=True, max_length=MAX_PASSWORD_LENGTH)
    body.done()
    assert old is not None and new is not None
    if identity.kind != "user":
        raise ApiError(400, "invalid_request", "service accounts never have a password")
    svc = services(request)
    address = source_address(request)
    retry = await svc.auth.throttle.retry_after(identity.name, address)
    if retry:
        raise ApiError(429, "throttled", f"too many wrong passwords; try again in {retry} s",
                       headers={"Retry-After": str(retry)})
    if not await svc.auth.verify_password(identity.principal_id, old):
        await svc.auth.throttle.failed(identity.name, address)
        raise ApiError(400, "invalid_request", "the current password is wrong",
                       {"current_password": "wrong password"})
    await lifecycle.reset_password(svc.pool, actor_for(request), svc.hash_secret, identity.name, new)
    # Everyone else holding this user's session is logged out; the caller keeps theirs.
    await svc.auth.end_sessions(identity.principal_id, keep=identity.session_hash)
    return no_content()
