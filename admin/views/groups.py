"""Permission groups (admin only): create, list, show, delete, add and remove members."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admin import lifecycle
from admin.auth import actor_for, current, require_admin
from admin.errors import json_response, no_content, not_found
from admin.views.common import Fields, page, page_limit, path_name, query_fields, read_json, services
from gateway.core import admin_sql
from gateway.core.store import Record


def public_group(row: Record) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "description": row["description"],
            "created_at": row["created_at"], "members": list(row["members"])}


async def list_groups(request: web.Request) -> web.Response:
    require_admin(current(request))
    query = query_fields(request, ())
    limit = page_limit(query)
    after = query.query_text("cursor", 64) or ""  # groups page by name: the cursor is the last name shown
    query.done()
    async with services(request).pool.acquire() as conn:
        rows = await conn.fetch(admin_sql.LIST_GROUPS_PAGE, after, limit + 1)
    items = [public_group(r) for r in rows[:limit]]
    return json_response(page(items, rows[limit - 1]["name"] if len(rows) > limit else None))


async def create_group(request: web.Request) -> web.Response:
    require_admin(current(request))
    body = Fields(await read_json(request), ("name", "description"))
    name = body.string("name", required=True, max_length=64)
    description = body.string("description", max_length=500) or ""
    body.done()
    assert name is not None
    created = await lifecycle.create_group(services(request).pool, actor_for(request), name, description)
    async with services(request).pool.acquire() as conn:
        row = await conn.fetchrow(admin_sql.GROUP_WITH_MEMBERS, name)
    return json_response(public_group(row) if row is not None else created, 201)


async def show_group(request: web.Request) -> web.Response:
    require_admin(current(request))
    name = path_name(request)
    async with services(request).pool.acquire() as conn:
        row = await conn.fetchrow(admin_sql.GROUP_WITH_MEMBERS, name)
    if row is None:
        raise not_found(f"no group named {name!r}", "name")
    return json_response(public_group(row))


async def delete_group(request: web.Request) -> web.Response:
    require_admin(current(request))
    await lifecycle.delete_group(services(request).pool, actor_for(request), path_name(request))
    return no_content()


async def add_member(request: web.Request) -> web.Response:
    return await _membership(request, add=True)


async def remove_member(request: web.Request) -> web.Response:
    return await _membership(request, add=False)


async def _membership(request: web.Request, add: bool) -> web.Response:
    """Idempotent: adding a member twice or removing a non-member changes nothing and still answers 204."""
    require_admin(current(request))
    await lifecycle.change_membership(services(request).pool, actor_for(request), path_name(request),
                                      path_name(request, "user"), add=add)
    return no_content()
