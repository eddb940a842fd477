"""The Users pages: interactive users and service accounts listed, created, disabled, enabled, deleted, and their
passwords reset; a user's page lists their credentials. The rules are the lifecycle's and the JSON API's."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admin import lifecycle
from admin.auth import actor_for, current
from admin.errors import ApiError
from admin.lifecycle import LifecycleError
from admin.ui.credential_forms import credential_view, when
from admin.ui.manage_forms import PAGE_SIZE, check_name, cursor_of, path, refusal
from admin.ui.web import redirect, render, require_admin_page
from admin.views.common import path_name, services

# The JSON API's rule that nobody disables, deletes or resets themselves: one home, reused here.
from admin.views.users import not_yourself, reset_and_sign_out
from gateway.core import admin_sql

KINDS = {"user": "User", "service": "Service account"}


async def users_page(request: web.Request) -> web.Response:
    require_admin_page(request)
    return await _users(request, {"name": "", "kind": "user", "groups": [], "is_admin": False}, {})


async def _users(request: web.Request, values: dict[str, Any], errors: dict[str, str], status: int = 200
                 ) -> web.Response:
    """The list (one page, optionally one kind) with the create form, showing `values` and `errors`."""
    kind = request.query.get("kind")
    kind = kind if kind in KINDS else None
    cursor = cursor_of(request)
    async with services(request).pool.acquire() as conn:
        rows = await conn.fetch(admin_sql.LIST_PRINCIPALS, kind, cursor or 0, PAGE_SIZE + 1)
        groups = [r["name"] for r in await conn.fetch(admin_sql.LIST_GROUPS)]
    users = [_user_view(lifecycle.public_principal(r)) for r in rows[:PAGE_SIZE]]
    next_cursor = rows[PAGE_SIZE - 1]["id"] if len(rows) > PAGE_SIZE else None
    return render(request, "users.html", {
        "users": users, "kinds": KINDS, "kind": kind or "", "next_cursor": next_cursor, "paged": cursor is not None,
        "all_groups": groups, "values": values, "errors": errors}, status=status)


def _user_view(principal: dict[str, Any]) -> dict[str, Any]:
    """A principal as the pages show it: kind and status in words, times for a `<time>` element."""
    return {**principal, "kind_label": KINDS.get(principal["kind"], principal["kind"]),
            "status": "Disabled" if principal["disabled"] else "Enabled", "created": when(principal["created_at"])}


async def create_user(request: web.Request) -> web.Response:
    """An interactive user gets a generated password, shown once; a service account gets none."""
    require_admin_page(request)
    data = await request.post()
    name = str(data.get("name", "")).strip()
    kind = str(data.get("kind", ""))
    groups = list(dict.fromkeys(g for g in data.getall("groups", []) if isinstance(g, str) and g))
    is_admin = "is_admin" in data
    values = {"name": name, "kind": kind, "groups": groups, "is_admin": is_admin}
    errors: dict[str, str] = {}
    if problem := check_name(name, "a name"):
        errors["name"] = problem
    if kind not in KINDS:
        errors["kind"] = "Choose User or Service account."
    if errors:
        return await _users(request, values, errors, 400)
    svc = services(request)
    try:
        created = await lifecycle.create_principal(
            svc.pool, actor_for(request), svc.hash_secret, name, service=kind == "service",
            admin=is_admin, groups=groups, generate=kind == "user")
    except LifecycleError as exc:
        return await _users(request, values, refusal(exc), exc.status)
    if created.password is None:
        raise redirect(path("users", name), "user-created")
    return render(request, "user_password.html", {
        "title": "User created", "name": name, "password": created.password, "done": "user-created"}, status=201)


async def user_page(request: web.Request) -> web.Response:
    """One user or service account: facts, actions, and their credentials with status words."""
    require_admin_page(request)
    name = path_name(request)
    cursor = cursor_of(request)
    svc = services(request)
    async with svc.pool.acquire() as conn:
        row = await lifecycle.get_principal(conn, name)
        groups = [r[0] for r in await conn.fetch(admin_sql.PRINCIPAL_GROUPS, row["id"])]
        credentials, next_cursor = await lifecycle.list_credentials(conn, owner_id=row["id"], after_id=cursor or 0,
                                                                    limit=PAGE_SIZE)
    now = lifecycle.now_utc()
    warning_days = svc.settings.gateway.expiry_warning_days
    return render(request, "user.html", {
        "user": _user_view(lifecycle.public_principal(row, groups)), "kinds": KINDS,
        "credentials": [credential_view(c, now, warning_days) for c in credentials],
        "next_cursor": next_cursor, "paged": cursor is not None, "is_me": name == current(request).name})


def _back(fields: Any, name: str) -> str:
    """Back to the list when the action was taken there, else to the user's page."""
    return "/users" if fields.get("back") == "/users" else path("users", name)


async def disable_user(request: web.Request) -> web.StreamResponse:
    require_admin_page(request)
    name = not_yourself(request, "disable")
    await lifecycle.set_disabled(services(request).pool, actor_for(request), name, True)
    raise redirect(_back(await request.post(), name), "user-disabled")


async def enable_user(request: web.Request) -> web.StreamResponse:
    require_admin_page(request)
    name = path_name(request)
    await lifecycle.set_disabled(services(request).pool, actor_for(request), name, False)
    raise redirect(_back(await request.post(), name), "user-enabled")


async def reset_password_page(request: web.Request) -> web.Response:
    """Asks first: the old password stops working and the user is signed out everywhere."""
    require_admin_page(request)
    name = path_name(request)
    async with services(request).pool.acquire() as conn:
        row = await lifecycle.get_principal(conn, name)
    return render(request, "user_reset.html", {"user": _user_view(lifecycle.public_principal(row, []))})


async def reset_password(request: web.Request) -> web.Response:
    """A new generated password, shown once; like the JSON API, the user's sessions end."""
    require_admin_page(request)
    name = not_yourself(request, "reset the password of")
    password = await reset_and_sign_out(request, name)
    return render(request, "user_password.html", {"title": "Password reset", "name": name, "password": password,
                                                         "done": "password-reset"})


async def delete_page(request: web.Request) -> web.Response:
    require_admin_page(request)
    return await _delete_form(request, path_name(request), None)


async def _delete_form(request: web.Request, name: str, error: str | None, status: int = 200) -> web.Response:
    async with services(request).pool.acquire() as conn:
        row = await lifecycle.get_principal(conn, name)
        credentials, _ = await lifecycle.list_credentials(conn, owner_id=row["id"], status="valid", limit=PAGE_SIZE)
    return render(request, "user_delete.html", {
        "user": _user_view(lifecycle.public_principal(row, [])), "valid_credentials": len(credentials),
        "more": len(credentials) >= PAGE_SIZE, "error": error}, status=status)


async def delete_user(request: web.Request) -> web.StreamResponse:
    """Only when the name is typed exactly: the principal goes and its credentials are revoked."""
    require_admin_page(request)
    name = path_name(request)
    if (await request.post()).get("confirm") != name:
        return await _delete_form(request, name, f"Type {name} exactly to confirm.", 400)
    try:
        not_yourself(request, "delete")
    except ApiError as exc:
        return await _delete_form(request, name, next(iter(refusal(exc).values())), exc.status)
    await lifecycle.delete_principal(services(request).pool, actor_for(request), name)
    raise redirect("/users", "user-deleted")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/users", users_page)
    router.add_post("/users", create_user)
    router.add_get("/users/{name}", user_page)
    router.add_post("/users/{name}/disable", disable_user)
    router.add_post("/users/{name}/enable", enable_user)
    router.add_get("/users/{name}/reset-password", reset_password_page)
    router.add_post("/users/{name}/reset-password", reset_password)
    router.add_get("/users/{name}/delete", delete_page)
    router.add_post("/users/{name}/delete", delete_user)
