"""Credential pages: my credentials (list, filters, pages), create with the once-only secret dialog, rotate,
edit, delete with confirmation, and a credential's detail with its usage chart and audit events.

Every rule (expiry policy, who may see what, rotation, revocation) is the lifecycle's or the JSON API's:
these handlers parse a form, call it, and render the result. Another user's credential is a 404 page.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from aiohttp import web

from admin import lifecycle
from admin.auth import actor_for, current
from admin.credential_limits import KEEP
from admin.ui.credential_forms import (
    CHART_DAYS,
    GRACE_CHOICES,
    KIND_LABELS,
    LIMIT_FIELDS,
    PAGE_SIZE,
    STATUS_LABELS,
    ExpiryBounds,
    ListQuery,
    credential_view,
    expiry_changed,
    field_errors,
    page_links,
    parse_expiry,
    parse_limits,
    secret_view,
    usage_chart,
    when,
)
from admin.ui.web import form, redirect, render
from admin.views.common import services
from admin.views.credentials import MAX_GRACE_SECONDS, visible_credential
from gateway.core import admin_sql, store
from gateway.core.store import Pool, Record

AUDIT_EVENTS_SHOWN = 50
# LIST_AUDIT's "before id" for the newest events (bigint's maximum).
NEWEST = 2**63 - 1


def badge_class(status: str) -> str:
    """The CSS class of a status badge (`Expires soon` → `badge-expires-soon`)."""
    return "badge badge-" + status.lower().replace(" ", "-")


# --- list and detail ------------------------------------------------------------------------------------------


async def list_page(request: web.Request) -> web.Response:
    identity = current(request)
    svc = services(request)
    query = ListQuery.parse(request.query)
    name_pattern, id_pattern = query.patterns()
    async with svc.pool.acquire() as conn:
        rows = await conn.fetch(
            store.LIST_CREDENTIALS_PAGE, None if identity.is_admin else identity.principal_id, query.kind or None,
            name_pattern, id_pattern, svc.settings.gateway.expiry_warning_days, query.statuses, query.after,
            query.before, PAGE_SIZE + 1)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    if query.before is not None:
        rows.reverse()
    return render(request, "credentials.html", {
        "rows": [_view(request, lifecycle.public_credential(r)) for r in rows],
        "pages": page_links(query, [r["id"] for r in rows], more),
        "query": query,
        "filtered": bool(query.status or query.kind or query.search),
        "status_choices": STATUS_LABELS,
        "kind_choices": KIND_LABELS,
    })


async def detail_page(request: web.Request) -> web.Response:
    svc = services(request)
    today = lifecycle.now_utc().date()
    since = today - timedelta(days=CHART_DAYS - 1)
    async with svc.pool.acquire() as conn:
        row = await visible_credential(conn, request)
        usage = await conn.fetch(store.USAGE_FOR_CREDENTIAL, row["id"], since)
        events = await conn.fetch(store.LIST_AUDIT, None, row["public_id"], None, None, None, NEWEST,
                                  AUDIT_EVENTS_SHOWN)
    return render(request, "credential_detail.html", {
        "c": _view(request, lifecycle.public_credential(row)),
        "chart": usage_chart({r["day"]: r["requests"] for r in usage}, today),
        "events": [_event_view(e) for e in events if e["target_type"] == "credential"],
    })


def _view(request: web.Request, credential: dict[str, Any]) -> dict[str, Any]:
    view = credential_view(credential, lifecycle.now_utc(), services(request).settings.gateway.expiry_warning_days)
    # a leak report revoked it: "Revoked (exposed)" and where the secret was found
    view.update(exposed=credential.get("revocation_reason") == "exposed", exposed_url=credential.get("exposed_url"),
                legacy=credential.get("legacy", False))  # imported: the badge suggests rotating to credgate's format
    return view


def _event_view(event: Record) -> dict[str, Any]:
    changes = event["changes"]
    if isinstance(changes, str):  # jsonb arrives as text unless a codec is set
        changes = json.loads(changes)
    return {"at": when(event["at"]), "actor": event["actor"], "action": event["action"],
            "changes": json.dumps(changes, sort_keys=True, default=str) if changes else ""}


# --- create and the secret dialog ---------------------------------------------------------------------------------


async def new_page(request: web.Request) -> web.Response:
    identity = current(request)
    bounds = ExpiryBounds.of(services(request).settings.policy, lifecycle.now_utc())
    values = {"name": "", "kind": "token", "expires": bounds.default.isoformat(), "never": "", "owner": identity.name,
              "rate_limit": "", "quota": ""}
    return await _form_page(request, "create", values, {})


async def create(request: web.Request) -> web.Response:
    """201 with the secret dialog, the only response that ever shows the secret; errors re-render the form."""
    identity = current(request)
    svc = services(request)
    fields = await form(request)
    values = _form_values(fields, identity.name)
    errors: dict[str, str] = {}
    if not values["name"]:
        errors["name"] = "Name: enter a name, so you can tell your credentials apart."
    if values["kind"] not in KIND_LABELS:
        errors["kind"] = "Kind: choose Token or Key pair."
    owner = values["owner"] if identity.is_admin else identity.name
    if identity.is_admin and owner not in await _owners(svc.pool):
        errors["owner"] = "Owner: choose a user or service account from the list."
    expiry, problem = parse_expiry(fields, lifecycle.now_utc())
    if problem:
        errors["expires"] = problem
    limits, limit_errors = parse_limits(fields) if identity.is_admin else ({}, {})  # only admins set limits
    errors.update(limit_errors)
    if errors:
        return await _form_page(request, "create", values, errors, status=400)
    try:
        issued = await lifecycle.create_credential(
            svc.pool, actor_for(request), svc.hash_secret, svc.settings.policy, owner=owner, kind=values["kind"],
            name=values["name"], expires_in_days="never" if expiry == "never" else None,
            expires_at=None if expiry == "never" else expiry, rate_limit=limits.get("rate_limit"),
            quota=limits.get("quota"))
    except lifecycle.LifecycleError as exc:
        return await _form_page(request, "create", values, field_errors(exc.field, exc.message), status=400)
    return _secret_page(request, issued, "created", status=201)


def _secret_page(request: web.Request, issued: lifecycle.IssuedSecret, done: str, status: int) -> web.Response:
    gateway = services(request).settings.gateway
    shown = secret_view(issued.reveal(), services(request).settings.gateway_url,
                        (gateway.access_key_header, gateway.secret_key_header))
    return render(request, "secret.html", {"c": _view(request, issued.credential), "done": done, **shown},
                  status=status)


# --- edit ---------------------------------------------------------------------------------------------------------


async def edit_page(request: web.Request) -> web.Response:
    row = await _changeable(request)
    expires = row["expires_at"]
    values = {"name": row["name"], "kind": row["kind"], "owner": row["owner_name"],
              "expires": expires.date().isoformat() if expires else "", "never": "" if expires else "on",
              "rate_limit": row["rate_limit"] or "", "quota": row["quota"] or ""}
    return await _form_page(request, "edit", values, {}, row=row)


async def edit(request: web.Request) -> web.StreamResponse:
    """Name, expiry (only when its date or `Never` changed) and, for administrators, the owner, rate limit and
    quota (an empty field removes that limit)."""
    identity = current(request)
    svc = services(request)
    row = await _changeable(request)
    fields = await form(request)
    values = {**_form_values(fields, row["owner_name"]), "kind": row["kind"]}
    errors: dict[str, str] = {}
    if not values["name"]:
        errors["name"] = "Name: enter a name."
    owner = values["owner"] if identity.is_admin else row["owner_name"]
    if identity.is_admin and owner != row["owner_name"] and owner not in await _owners(svc.pool):
        errors["owner"] = "Owner: choose a user or service account from the list."
    expiry, problem = parse_expiry(fields, lifecycle.now_utc())
    if problem:
        errors["expires"] = problem
    limits, limit_errors = parse_limits(fields) if identity.is_admin else ({}, {})
    errors.update(limit_errors)
    if errors:
        return await _form_page(request, "edit", values, errors, row=row, status=400)
    # a field the form did not send (another user's form, an old page) keeps its value
    changes = {field: limits[field] if field in limits and field in fields else KEEP for field in LIMIT_FIELDS}
    change_expiry = expiry_changed(expiry, row["expires_at"])
    try:
        await lifecycle.update_credential(
            svc.pool, actor_for(request), svc.settings.policy, row["public_id"], name=values["name"],
            owner=owner if owner != row["owner_name"] else None, change_expiry=change_expiry,
            expires_in_days="never" if change_expiry and expiry == "never" else None,
            expires_at=expiry if change_expiry and expiry != "never" else None, rate_limit=changes["rate_limit"],
            quota=changes["quota"])
    except lifecycle.LifecycleError as exc:
        if exc.status == 409:
            raise
        return await _form_page(request, "edit", values, field_errors(exc.field, exc.message), row=row, status=400)
    raise redirect("/credentials", "updated")


def _form_values(fields: dict[str, str], default_owner: str) -> dict[str, str]:
    return {"name": fields.get("name", "").strip(), "kind": fields.get("kind", ""),
            "expires": fields.get("expires", "").strip(), "never": "on" if fields.get("never") == "on" else "",
            "owner": fields.get("owner", "").strip() or default_owner,
            "rate_limit": fields.get("rate_limit", "").strip(), "quota": fields.get("quota", "").strip()}


async def _form_page(request: web.Request, mode: str, values: dict[str, str], errors: dict[str, str], *,
                     row: Record | None = None, status: int = 200) -> web.Response:
    """The create or edit dialog page; `Owner` (every user and service account) only for administrators."""
    identity = current(request)
    svc = services(request)
    bounds = ExpiryBounds.of(svc.settings.policy, lifecycle.now_utc())
    owners = await _owners(svc.pool) if identity.is_admin else None
    if owners is not None and values["owner"] not in owners:
        owners.insert(0, values["owner"])  # re-rendered after a bad choice: show what was chosen
    context = {"mode": mode, "values": values, "errors": errors, "owners": owners, "kind_choices": KIND_LABELS,
               "c": _view(request, lifecycle.public_credential(row)) if row is not None else None,
               **bounds.context()}
    return render(request, "credential_form.html", context, status=status)


async def _owners(pool: Pool) -> list[str]:
    """The names of every user and service account, for the administrators' `Owner` select."""
    names: list[str] = []
    after = 0
    async with pool.acquire() as conn:
        while True:
            rows = await conn.fetch(admin_sql.LIST_PRINCIPALS, None, after, 500)
            names.extend(r["name"] for r in rows)
            if len(rows) < 500:
                return sorted(names)
            after = rows[-1]["id"]


async def _changeable(request: web.Request) -> Record:
    """The credential in the path, visible to the caller and not revoked (revoked credentials offer no actions)."""
    async with services(request).pool.acquire() as conn:
        row = await visible_credential(conn, request)
    if row["revoked_at"] is not None:
        raise lifecycle.Conflict("This credential is revoked: it can no longer be rotated, changed or deleted.")
    return row


# --- rotate -------------------------------------------------------------------------------------------------------


async def rotate_page(request: web.Request) -> web.Response:
    row = await _changeable(request)
    return render(request, "credential_rotate.html", {"c": _view(request, lifecycle.public_credential(row)),
                                                      "choices": GRACE_CHOICES, "chosen": "now", "error": None})


async def rotate(request: web.Request) -> web.Response:
    svc = services(request)
    row = await _changeable(request)
    choice = (await form(request)).get("grace", "")
    if choice not in GRACE_CHOICES:
        return render(request, "credential_rotate.html", {
            "c": _view(request, lifecycle.public_credential(row)), "choices": GRACE_CHOICES, "chosen": "now",
            "error": "When the old secret stops: choose Now, After 1 hour or After 24 hours."}, status=400)
    issued = await lifecycle.rotate_credential(svc.pool, actor_for(request), svc.hash_secret, row["public_id"],
                                               grace_seconds=GRACE_CHOICES[choice][1],
                                               max_grace_seconds=MAX_GRACE_SECONDS)
    return _secret_page(request, issued, "rotated", status=200)


# --- delete -------------------------------------------------------------------------------------------------------


async def delete_page(request: web.Request) -> web.Response:
    row = await _changeable(request)
    return render(request, "credential_delete.html", {"c": _view(request, lifecycle.public_credential(row)),
                                                      "typed": "", "error": None})


async def delete(request: web.Request) -> web.StreamResponse:
    """Revoke (irreversible) once the credential's name has been typed exactly; the server checks it too."""
    svc = services(request)
    row = await _changeable(request)
    view = _view(request, lifecycle.public_credential(row))
    typed = (await form(request)).get("confirm_name", "")
    if typed != view["confirm_text"]:
        return render(request, "credential_delete.html", {
            "c": view, "typed": typed,
            "error": "The name you typed does not match. Type the credential's name exactly to delete it."},
            status=400)
    await lifecycle.revoke_credential(svc.pool, actor_for(request), row["public_id"])
    raise redirect("/credentials", "deleted")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/credentials", list_page)
    router.add_get("/credentials/new", new_page)
    router.add_post("/credentials/new", create)
    router.add_get("/credentials/{id}", detail_page)
    router.add_get("/credentials/{id}/rotate", rotate_page)
    router.add_post("/credentials/{id}/rotate", rotate)
    router.add_get("/credentials/{id}/edit", edit_page)
    router.add_post("/credentials/{id}/edit", edit)
    router.add_get("/credentials/{id}/delete", delete_page)
    router.add_post("/credentials/{id}/delete", delete)
