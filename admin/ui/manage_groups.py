"""The Groups pages: permission groups listed, created and deleted (after confirmation), and a group's members
added and removed. The rules are the lifecycle's."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admin import lifecycle
from admin.auth import actor_for
from admin.errors import ApiError
from admin.lifecycle import LifecycleError
from admin.ui.credential_forms import when
from admin.ui.manage_forms import MAX_NAME_LENGTH, PAGE_SIZE, check_name, path, refusal
from admin.ui.web import redirect, render, require_admin_page
from admin.views.common import path_name, services, storable
from gateway.core import admin_sql, store

MAX_DESCRIPTION_LENGTH = 500  # as the JSON API allows
# How many principal names the add-member field suggests (a datalist; any other name can still be typed).
SUGGESTED_MEMBERS = 500


async def groups_page(request: web.Request) -> web.Response:
    require_admin_page(request)
    return await _groups(request, {"name": "", "description": ""}, {})


async def _groups(request: web.Request, values: dict[str, str], errors: dict[str, str], status: int = 200
                  ) -> web.Response:
    after = request.query.get("after", "")[:MAX_NAME_LENGTH]  # groups page by name, like the JSON API
    async with services(request).pool.acquire() as conn:
        rows = await conn.fetch(admin_sql.LIST_GROUPS_PAGE, after, PAGE_SIZE + 1)
    groups = [_group(r) for r in rows[:PAGE_SIZE]]
    return render(request, "groups.html", {
        "groups": groups, "next_after": groups[-1]["name"] if len(rows) > PAGE_SIZE else None, "paged": bool(after),
        "values": values, "errors": errors}, status=status)


def _group(row: store.Record) -> dict[str, Any]:
    return {"name": row["name"], "description": row["description"], "created": when(row["created_at"]),
            "members": list(row["members"])}


async def create_group(request: web.Request) -> web.Response:
    require_admin_page(request)
    data = await request.post()
    values = {"name": str(data.get("name", "")).strip(), "description": str(data.get("description", "")).strip()}
    errors: dict[str, str] = {}
    if problem := check_name(values["name"], "a group name"):
        errors["name"] = problem
    if len(values["description"]) > MAX_DESCRIPTION_LENGTH or not storable(values["description"]):
        errors["description"] = f"The description must be at most {MAX_DESCRIPTION_LENGTH} characters."
    if errors:
        return await _groups(request, values, errors, 400)
    try:
        await lifecycle.create_group(services(request).pool, actor_for(request), values["name"], values["description"])
    except LifecycleError as exc:
        return await _groups(request, values, refusal(exc), exc.status)
    raise redirect(path("groups", values["name"]), "group-created")


async def _group_or_404(request: web.Request, name: str) -> tuple[dict[str, Any], list[str]]:
    """The group with its members, and principal names to suggest for adding."""
    async with services(request).pool.acquire() as conn:
        row = await conn.fetchrow(admin_sql.GROUP_WITH_MEMBERS, name)
        if row is None:
            raise ApiError(404, "not_found", f"There is no group named {name!r}.")
        principals = await conn.fetch(admin_sql.LIST_PRINCIPALS, None, 0, SUGGESTED_MEMBERS)
    group = _group(row)
    return group, [p["name"] for p in principals if p["name"] not in group["members"]]


async def group_page(request: web.Request) -> web.Response:
    require_admin_page(request)
    return await _group_page(request, path_name(request), "", {})


async def _group_page(request: web.Request, name: str, member: str, errors: dict[str, str], status: int = 200
                      ) -> web.Response:
    group, candidates = await _group_or_404(request, name)
    return render(request, "group.html", {"group": group, "candidates": candidates, "member": member,
                                          "errors": errors}, status=status)


async def add_member(request: web.Request) -> web.Response:
    require_admin_page(request)
    name = path_name(request)
    member = str((await request.post()).get("member", "")).strip()
    if problem := check_name(member, "the name of a user or service account"):
        return await _group_page(request, name, member, {"member": problem}, 400)
    try:
        await lifecycle.change_membership(services(request).pool, actor_for(request), name, member, add=True)
    except LifecycleError as exc:
        if exc.field == "group":
            raise
        return await _group_page(request, name, member, refusal(exc, {"name": "member"}), exc.status)
    raise redirect(path("groups", name), "member-added")


async def remove_member(request: web.Request) -> web.StreamResponse:
    require_admin_page(request)
    name = path_name(request)
    await lifecycle.change_membership(services(request).pool, actor_for(request), name,
                                      path_name(request, "member"), add=False)
    raise redirect(path("groups", name), "member-removed")


async def delete_page(request: web.Request) -> web.Response:
    require_admin_page(request)
    return await _delete_form(request, path_name(request), None)


async def _delete_form(request: web.Request, name: str, error: str | None, status: int = 200) -> web.Response:
    group, _ = await _group_or_404(request, name)
    return render(request, "group_delete.html", {"group": group, "error": error}, status=status)


async def delete_group(request: web.Request) -> web.StreamResponse:
    """Only when the name is typed exactly; members lose the group's permissions at once."""
    require_admin_page(request)
    name = path_name(request)
    if (await request.post()).get("confirm") != name:
        return await _delete_form(request, name, f"Type {name} exactly to confirm.", 400)
    await lifecycle.delete_group(services(request).pool, actor_for(request), name)
    raise redirect("/groups", "group-deleted")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/groups", groups_page)
    router.add_post("/groups", create_group)
    router.add_get("/groups/{name}", group_page)
    router.add_post("/groups/{name}/members", add_member)
    router.add_post("/groups/{name}/members/{member}/remove", remove_member)
    router.add_get("/groups/{name}/delete", delete_page)
    router.add_post("/groups/{name}/delete", delete_group)
