"""The audit trail (admin only), newest first, filtered by actor, target, action and time range."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admin.auth import current, require_admin
from admin.errors import json_response
from admin.views.common import id_cursor, page, page_limit, query_fields, services
from gateway.core import store
from gateway.core.store import Record

# Pages run backwards by id; the first page starts above every id.
NO_CURSOR = 2**63 - 1
AUDIT_FIELDS = ("id", "at", "actor", "actor_id", "auth_method", "action", "target_type", "target", "changes",
                "request_id", "source")


def public_event(row: Record) -> dict[str, Any]:
    return {name: row[name] for name in AUDIT_FIELDS}


async def list_audit(request: web.Request) -> web.Response:
    require_admin(current(request))
    query = query_fields(request, ("actor", "target", "action", "since", "until"))
    actor = query.query_text("actor", 200)
    target = query.query_text("target", 200)
    action = query.query_text("action", 100)
    since = query.query_time("since")
    until = query.query_time("until")
    limit = page_limit(query)
    cursor = id_cursor(query)
    query.done()
    async with services(request).pool.acquire() as conn:
        rows = await conn.fetch(store.LIST_AUDIT, actor, target, action, since, until,
                                NO_CURSOR if cursor is None else cursor, limit + 1)
    items = [public_event(r) for r in rows[:limit]]
    return json_response(page(items, rows[limit - 1]["id"] if len(rows) > limit else None))
