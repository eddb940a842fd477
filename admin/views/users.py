"""Users and service accounts (admin only): create, list, show, disable, enable, delete, reset password."""

from __future__ import annotations

from aiohttp import web

from admin import lifecycle
from admin.auth import actor_for, current, require_admin
from admin.errors import ApiError, json_response, no_content
from admin.views.common import Fields, id_cursor, page, page_limit, path_name, query_fields, read_json, services
from gateway.core import admin_sql


async def list_users(request: web.Request) -> web.Response:
    require_admin(current(request))
    query = query_fields(request, ("kind",))
    kind = query.query_choice("kind", ("user", "service"))
    limit = page_limit(query)
    cursor = id_cursor(query)
    query.done()
    async with services(request).pool.acquire() as conn:
        rows = await conn.fetch(admin_sql.LIST_PRINCIPALS, kind, cursor or 0, limit + 1)
    items = [lifecycle.public_principal(r) for r in rows[:limit]]
    return json_response(page(items, rows[limit - 1]["id"] if len(rows) > limit else None))


async def create_user(request: web.Request) -> web.Response:
    """An interactive user gets a generated password (shown once) unless one is given; a service account none."""
    require_admin(current(request))
    body = Fields(await read_json(request), ("name", "kind", "is_admin", "groups", "password"))
    name = body.string("name", required=True, max_length=128)
    kind = body.data.get("kind", "user")
    if kind not in ("user", "service"):
        body.fail("kind", "\"user\" or \"service\"")
    is_admin = body.boolean("is_admin")
    groups = body.names("groups")
    password = body.string("password", max_length=1024)
    body.done()
    assert name is not None
    svc = services(request)
    created = await lifecycle.create_principal(
        svc.pool, actor_for(request), svc.hash_secret, name, service=kind == "service", admin=is_admin,
        groups=groups, password=password, generate=kind == "user" and password is None)
    out = dict(created.principal)
    if created.password is not None and password is None:
        out["password"] = created.password
    return json_response(out, 201)


async def show_user(request: web.Request) -> web.Response:
    require_admin(current(request))
    async with services(request).pool.acquire() as conn:
        row = await lifecycle.get_principal(conn, path_name(request))
        groups = [r[0] for r in await conn.fetch(admin_sql.PRINCIPAL_GROUPS, row["id"])]
    return json_response(lifecycle.public_principal(row, groups))


def not_yourself(request: web.Request, verb: str) -> str:
    identity = current(request)
    require_admin(identity)
    name = path_name(request)
    if name == identity.name:
        # An admin locking themselves out is always a mistake; another admin can do it if really meant.
        raise ApiError(409, "conflict", f"you cannot {verb} your own account", {"name": "that is you"})
    return name


async def disable_user(request: web.Request) -> web.Response:
    name = not_yourself(request, "disable")
    return json_response(await lifecycle.set_disabled(services(request).pool, actor_for(request), name, True))


async def enable_user(request: web.Request) -> web.Response:
    require_admin(current(request))
    name = path_name(request)
    return json_response(await lifecycle.set_disabled(services(request).pool, actor_for(request), name, False))


async def delete_user(request: web.Request) -> web.Response:
    name = not_yourself(request, "delete")
    await lifecycle.delete_principal(services(request).pool, actor_for(request), name)
    return no_content()


async def reset_password(request: web.Request) -> web.Response:
    """A new generated password for an interactive user, shown once; their sessions end."""
    name = not_yourself(request, "reset the password of")
    return json_response({"name": name, "password": await reset_and_sign_out(request, name)})


async def reset_and_sign_out(request: web.Request, name: str) -> str:
    """A new generated password (shown once by the caller); every session of that user ends."""
    svc = services(request)
    password = await lifecycle.reset_password(svc.pool, actor_for(request), svc.hash_secret, name)
    async with svc.pool.acquire() as conn:
        row = await lifecycle.get_principal(conn, name)
    await svc.auth.end_sessions(row["id"])
    return password
