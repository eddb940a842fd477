"""Credentials: create, list, show, edit, rotate, revoke, usage. Admins touch every credential; anyone else
only their own, and another principal's credential reads as 404 so its existence is not revealed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web

from admin import lifecycle
from admin.auth import actor_for, current
from admin.credential_limits import KEEP, MAX_TEXT_LENGTH, Change, LimitError, LimitField, canonical
from admin.errors import forbidden, json_response, no_content
from admin.idempotency import IDEMPOTENCY_HEADER, check_key
from admin.views.common import Fields, id_cursor, page, page_limit, query_fields, read_json, services
from gateway.core import admin_sql, store
from gateway.core.store import Connection, Record

KINDS = ("token", "key")
STATUSES = ("valid", "expired", "suspended", "revoked")
MAX_GRACE_SECONDS = 7 * 86400
MAX_USAGE_DAYS = 366


async def visible_credential(conn: Connection, request: web.Request) -> Record:
    """The credential named in the path, when the caller may see it."""
    identity = current(request)
    public_id = request.match_info["id"]
    row = await lifecycle.get_credential(conn, public_id)
    if not identity.is_admin and row["owner_id"] != identity.principal_id:
        raise lifecycle.NotFound(f"no credential {public_id!r}", "id")
    return row


def _owner_allowed(request: web.Request, owner: str | None) -> None:
    identity = current(request)
    if owner is not None and owner != identity.name and not identity.is_admin:
        raise forbidden("only an admin may act on another principal's credentials")


def limit_field(body: Fields, name: LimitField) -> Change:
    """`rate_limit` / `quota`: KEEP when absent, None for null or "none", else the canonical policy text."""
    if name not in body.data:
        return KEEP
    if body.data[name] is None:
        return None
    value = body.string(name, max_length=MAX_TEXT_LENGTH)
    if value is None:
        return KEEP  # body.string named the problem
    try:
        return canonical(value, name)
    except LimitError as exc:
        body.fail(name, exc.message)
        return KEEP


def _limits_allowed(request: web.Request, rate_limit: Change, quota: Change, row: Record | None = None) -> None:
    """Limits protect the upstreams from a credential's holder, so only an admin changes them (anyone may send
    back the values they have, e.g. a GET response turned into a PATCH)."""
    changed = any(change is not KEEP and change != (None if row is None else row[name])
                  for name, change in (("rate_limit", rate_limit), ("quota", quota)))
    if changed and not current(request).is_admin:
        raise forbidden("only an admin may change a credential's rate_limit or quota")


async def list_credentials(request: web.Request) -> web.Response:
    identity = current(request)
    query = query_fields(request, ("owner", "status", "kind", "expiring_before"))
    owner = query.query_text("owner", 128)
    status = query.query_choice("status", STATUSES)
    kind = query.query_choice("kind", KINDS)
    expiring_before = query.query_time("expiring_before")
    limit = page_limit(query)
    cursor = id_cursor(query)
    query.done()
    _owner_allowed(request, owner)
    async with services(request).pool.acquire() as conn:
        owner_id: int | None = None if identity.is_admin else identity.principal_id
        if owner is not None and identity.is_admin:
            owner_row = await conn.fetchrow(admin_sql.PRINCIPAL_BY_NAME, owner)
            if owner_row is None:
                return json_response(page([], None))
            owner_id = owner_row["id"]
        items, next_cursor = await lifecycle.list_credentials(
            conn, owner_id=owner_id, kind=kind, status=status, expiring_before=expiring_before,
            after_id=cursor or 0, limit=limit)
    return json_response(page(items, next_cursor))


async def create_credential(request: web.Request) -> web.Response:
    """201 with the secret: the only response that will ever show it."""
    identity = current(request)
    body = Fields(await read_json(request),
                  ("kind", "name", "owner", "expires_at", "expires_in_days", "rate_limit", "quota"))
    kind = body.data.get("kind")
    if kind not in KINDS:
        body.fail("kind", "required: \"token\" or \"key\"")
    name = body.string("name", max_length=200) or ""
    owner = body.string("owner", max_length=128)
    expires_at = body.timestamp("expires_at")
    expires_in_days = body.expiry_days("expires_in_days")
    rate_limit, quota = limit_field(body, "rate_limit"), limit_field(body, "quota")
    body.done()
    _owner_allowed(request, owner)
    _limits_allowed(request, rate_limit, quota)
    svc = services(request)
    issued = await lifecycle.create_credential(
        svc.pool, actor_for(request), svc.hash_secret, svc.settings.policy, owner=owner or identity.name,
        kind=str(kind), name=name, expires_in_days=expires_in_days, expires_at=expires_at,
        rate_limit=None if rate_limit is KEEP else rate_limit, quota=None if quota is KEEP else quota)
    return json_response(issued.reveal(), 201)


async def show_credential(request: web.Request) -> web.Response:
    async with services(request).pool.acquire() as conn:
        row = await visible_credential(conn, request)
    return json_response(lifecycle.public_credential(row))


async def update_credential(request: web.Request) -> web.Response:
    """Name, expiry (within policy) and, for admins, the owner, rate limit and quota (null or "none" removes
    one); the gateways see the change at once."""
    body = Fields(await read_json(request), ("name", "owner", "expires_at", "expires_in_days", "rate_limit", "quota"))
    name = body.string("name", max_length=200)
    owner = body.string("owner", max_length=128)
    expires_at = body.timestamp("expires_at")
    expires_in_days = body.expiry_days("expires_in_days")
    rate_limit, quota = limit_field(body, "rate_limit"), limit_field(body, "quota")
    body.done()
    svc = services(request)
    async with svc.pool.acquire() as conn:
        row = await visible_credential(conn, request)
    _owner_allowed(request, owner)
    _limits_allowed(request, rate_limit, quota, row)
    updated = await lifecycle.update_credential(
        svc.pool, actor_for(request), svc.settings.policy, row["public_id"], name=name, owner=owner,
        expires_in_days=expires_in_days, expires_at=expires_at,
        change_expiry=expires_at is not None or expires_in_days is not None, rate_limit=rate_limit, quota=quota)
    return json_response(updated)


async def rotate_credential(request: web.Request) -> web.Response:
    """A new secret for the same id; with Idempotency-Key a retry returns the first response."""
    identity = current(request)
    body = Fields(await read_json(request), ("grace_seconds",))
    grace = body.integer("grace_seconds", minimum=0, maximum=MAX_GRACE_SECONDS, default=0) or 0
    body.done()
    key = request.headers.get(IDEMPOTENCY_HEADER)
    svc = services(request)
    async with svc.pool.acquire() as conn:
        public_id = (await visible_credential(conn, request))["public_id"]

    async def rotate() -> dict[str, Any]:
        issued = await lifecycle.rotate_credential(svc.pool, actor_for(request), svc.hash_secret, public_id,
                                                   grace_seconds=grace, max_grace_seconds=MAX_GRACE_SECONDS)
        return issued.reveal()

    if key is None:
        return json_response(await rotate())
    result, replayed = await svc.replay.run(identity.principal_id, check_key(key), public_id, grace, rotate)
    return json_response(result, headers={"Idempotent-Replayed": "true"} if replayed else None)


async def revoke_credential(request: web.Request) -> web.Response:
    """Irreversible; the credential stays listed as revoked. Revoking twice is a no-op."""
    svc = services(request)
    async with svc.pool.acquire() as conn:
        public_id = (await visible_credential(conn, request))["public_id"]
    await lifecycle.revoke_credential(svc.pool, actor_for(request), public_id)
    return no_content()


async def credential_usage(request: web.Request) -> web.Response:
    """Last use and requests per day, as flushed by the gateways (a few seconds behind)."""
    query = query_fields(request, ("days",), paginated=False)
    days = query.query_int("days", minimum=1, maximum=MAX_USAGE_DAYS, default=30)
    query.done()
    async with services(request).pool.acquire() as conn:
        row = await visible_credential(conn, request)
        since = (lifecycle.now_utc() - timedelta(days=days - 1)).date()
        rows = await conn.fetch(store.USAGE_FOR_CREDENTIAL, row["id"], since)
    per_day = [{"day": r["day"], "requests": r["requests"]} for r in rows]
    return json_response({"id": row["public_id"], "last_used_at": row["last_used_at"], "since": since,
                          "days": per_day, "total_requests": sum(r["requests"] for r in rows)})
