"""API accounts: how administrators hand credentials to a permission group. One form creates a service account
in the chosen group and its key pair, then shows the secret once."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web

from admin import lifecycle
from admin.auth import actor_for
from admin.lifecycle import LifecycleError
from admin.ui.credential_forms import secret_view, when
from admin.ui.manage_forms import check_name, refusal
from admin.ui.web import render, require_admin_page
from admin.views.common import services
from gateway.core import admin_sql

# Lifecycle field names → this form's fields.
FIELDS = {"groups": "group", "expires_at": "expires_in_days"}


async def new_page(request: web.Request) -> web.Response:
    require_admin_page(request)
    policy = services(request).settings.policy
    values = {"name": "", "group": request.query.get("group", ""), "expires_in_days": str(policy.default_expiry_days),
              "never": False}
    return await _form(request, values, {})


async def _form(request: web.Request, values: dict[str, Any], errors: dict[str, str], status: int = 200
                ) -> web.Response:
    async with services(request).pool.acquire() as conn:
        groups = [r["name"] for r in await conn.fetch(admin_sql.LIST_GROUPS)]
    return render(request, "api_account_new.html", {
        "groups": groups, "policy": services(request).settings.policy, "values": values, "errors": errors},
        status=status)


def _expiry(values: dict[str, Any], errors: dict[str, str]) -> int | Literal["never"] | None:
    if values["never"]:
        return "never"
    text = values["expires_in_days"]
    if not (text.isascii() and text.isdigit()) or len(text) > 6 or int(text) < 1:
        errors["expires_in_days"] = "Enter a whole number of days, 1 or more."
        return None
    return int(text)


async def create_api_account(request: web.Request) -> web.Response:
    """The service account, its membership and its key pair; the secret is in this response only."""
    require_admin_page(request)
    data = await request.post()
    name, group = str(data.get("name", "")).strip(), str(data.get("group", ""))
    values = {"name": name, "group": group, "expires_in_days": str(data.get("expires_in_days", "")).strip(),
              "never": "never" in data}
    errors: dict[str, str] = {}
    if problem := check_name(name, "a name for the account"):
        errors["name"] = problem
    if not group:
        errors["group"] = "Choose the permission group the account acts for."
    expires_in_days = _expiry(values, errors)
    svc = services(request)
    try:
        # The expiry policy is checked before anything is created: a refused expiry leaves no account behind.
        lifecycle.resolve_expiry(svc.settings.policy, expires_in_days=expires_in_days)
    except LifecycleError as exc:
        errors.update(refusal(exc, FIELDS))
    if errors:
        return await _form(request, values, errors, 400)
    actor = actor_for(request)
    try:
        issued = await lifecycle.create_api_account(
            svc.pool, actor, svc.hash_secret, svc.settings.policy, name=name, group=group,
            expires_in_days=expires_in_days, credential_name=f"API key for group {group}")
    except LifecycleError as exc:
        return await _form(request, values, refusal(exc, FIELDS), exc.status)
    headers = (svc.settings.gateway.access_key_header, svc.settings.gateway.secret_key_header)
    return render(request, "api_account_secret.html", {
        "account": name, "group": group, "expires": when(issued.credential["expires_at"]),
        "done": "api-account-created",
        **secret_view(issued.reveal(), svc.settings.gateway_url, headers)}, status=201)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/api-accounts/new", new_page)
    router.add_post("/api-accounts/new", create_api_account)
