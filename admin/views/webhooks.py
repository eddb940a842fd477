"""Lifecycle-event webhooks in the admin API: the delivery list (admins) and a user's own webhook URL."""

from __future__ import annotations

from aiohttp import web

from admin import webhooks
from admin.auth import actor_for, current, require_admin
from admin.errors import ApiError, json_response
from admin.views.common import Fields, id_cursor, page, page_limit, path_name, query_fields, read_json, services
from gateway.core import outbox

# Pages run backwards by id; the first page starts above every id.
NO_CURSOR = 2**63 - 1


async def list_deliveries(request: web.Request) -> web.Response:
    """Deliveries newest first, by status: failed ones are what an operator looks at."""
    require_admin(current(request))
    query = query_fields(request, ("status",))
    status = query.query_choice("status", outbox.DELIVERY_STATUSES)
    limit = page_limit(query)
    cursor = id_cursor(query)
    query.done()
    async with services(request).pool.acquire() as conn:
        rows = await conn.fetch(outbox.LIST_DELIVERIES, status, NO_CURSOR if cursor is None else cursor, limit + 1)
    items = [outbox.public_delivery(r) for r in rows[:limit]]
    return json_response(page(items, rows[limit - 1]["id"] if len(rows) > limit else None))


async def show_webhook(request: web.Request) -> web.Response:
    require_admin(current(request))
    name = path_name(request)
    async with services(request).pool.acquire() as conn:
        row = await conn.fetchrow(outbox.WEBHOOK_URL_OF, name)
    if row is None:
        raise ApiError(404, "not_found", f"no user or service account named {name!r}", {"name": "not found"})
    return json_response({"name": row["name"], "webhook_url": row["webhook_url"]})


async def set_webhook(request: web.Request) -> web.Response:
    """{"webhook_url": "https://..."} sets the owner's own URL (its credentials' events go there too); null clears."""
    require_admin(current(request))
    name = path_name(request)
    body = Fields(await read_json(request), ("webhook_url",))
    if "webhook_url" not in body.data:
        body.fail("webhook_url", "required: a URL, or null to clear it")
    url = body.string("webhook_url", max_length=2000)
    body.done()
    return json_response(await webhooks.set_owner_url(services(request).pool, actor_for(request), name, url))
