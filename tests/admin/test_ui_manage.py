"""The administrator pages: users, groups, API accounts and the audit log, driven as a browser would."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

from admin import lifecycle
from tests.admin.world import PASSWORDS, World, world

__all__ = ["world"]  # the fixture

CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')
ADMIN_PAGES = ["/users", "/users/alice", "/users/alice/delete", "/users/alice/reset-password", "/groups",
               "/groups/ops", "/groups/ops/delete", "/api-accounts/new", "/audit"]
ADMIN_POSTS = ["/users", "/users/bob/disable", "/users/bob/enable", "/users/bob/reset-password", "/users/bob/delete",
               "/groups", "/groups/ops/members", "/groups/ops/members/bob/remove", "/groups/ops/delete",
               "/api-accounts/new"]
CREATE_USER, CREATE_GROUP, ADD_MEMBER = ("<code>principal.create</code>", "<code>group.create</code>",
                                        "<code>group.add_member</code>")


async def sign_in(w: World, who: str) -> None:
    w.client.session.cookie_jar.clear()
    async with w.client.get("/sign-in") as resp:
        token = _csrf(await resp.text())
    async with w.client.post("/sign-in", data={"username": who, "password": PASSWORDS[who], "csrf_token": token,
                                                "next": "/credentials"}, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()


def _csrf(text: str) -> str:
    match = CSRF.search(text)
    assert match is not None, text
    return match.group(1)


async def get(w: World, path: str, status: int = 200) -> str:
    async with w.client.get(path, allow_redirects=False) as resp:
        text = await resp.text()
        assert resp.status == status, text
        return text


async def post(w: World, path: str, data: Any, status: int = 303, csrf: bool = True) -> tuple[str, str]:
    """POST a form (with the session's CSRF token, read from a page); returns (body, Location)."""
    if csrf:
        token = _csrf(await get(w, "/credentials"))
        data = [*(data.items() if isinstance(data, dict) else data), ("csrf_token", token)]
    async with w.client.post(path, data=data, allow_redirects=False) as resp:
        text = await resp.text()
        assert resp.status == status, text
        return text, resp.headers.get("Location", "")


def field(text: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}" readonly value="([^"]*)"', text)
    assert match is not None, text
    return html.unescape(match.group(1))


@pytest.fixture
async def admin(world: World) -> World:
    await world.group("ops")
    await sign_in(world, "root")
    return world


@pytest.mark.parametrize("path", ADMIN_PAGES)
async def test_pages_are_for_administrators_only(world: World, path: str) -> None:
    await world.group("ops")
    await sign_in(world, "alice")
    text = await get(world, path, 403)
    assert "Only administrators can open this page." in text


@pytest.mark.parametrize("path", ADMIN_POSTS)
async def test_actions_are_for_administrators_only(world: World, path: str) -> None:
    await world.group("ops")
    await sign_in(world, "alice")
    text, _ = await post(world, path, {"name": "x", "confirm": "bob", "member": "bob", "group": "ops"}, 403)
    assert "Only administrators" in text
    async with world.pool.acquire() as conn:
        assert not await conn.fetchval("SELECT disabled FROM principals WHERE name = 'bob'")


async def test_signed_out_visitors_are_sent_to_sign_in(world: World) -> None:
    async with world.client.get("/users", allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/sign-in?next=/users"


async def test_post_without_csrf_token_is_refused(admin: World) -> None:
    text, _ = await post(admin, "/users/bob/disable", {}, 403, csrf=False)
    assert "did not come from this site" in text
    async with admin.pool.acquire() as conn:
        assert not await conn.fetchval("SELECT disabled FROM principals WHERE name = 'bob'")


async def test_users_page_lists_kinds_groups_and_status(admin: World) -> None:
    text = await get(admin, "/users")
    for words in ("<th scope=\"col\">Kind</th>", "Service account", ">User<", "Enabled", "alice", "svc"):
        assert words in text
    assert "Disable alice" in text and "Disable root" not in text  # nobody disables themselves
    assert "kind=service" not in text
    assert "svc" not in await get(admin, "/users?kind=user")


async def test_create_interactive_user_shows_password_once(admin: World) -> None:
    text, _ = await post(admin, "/users", [("name", "carol"), ("kind", "user"), ("groups", "ops"),
                                           ("is_admin", "yes")], 201)
    assert "Copy the password now" in text and "You will not be able to see this password again" in text
    assert "I have copied the password" in text and 'data-enables="password-close"' in text
    password = field(text, "password-value")
    async with admin.pool.acquire() as conn:
        row = await lifecycle.get_principal(conn, "carol")
        assert row["is_admin"] and row["kind"] == "user"
        assert await conn.fetch("SELECT 1 FROM memberships WHERE principal_id = $1", row["id"])
    page = await get(admin, "/users/carol")
    assert password not in page and "ops" in page
    await sign_in(admin, "root")
    admin.client.session.cookie_jar.clear()
    async with admin.client.get("/sign-in") as resp:
        token = _csrf(await resp.text())
    async with admin.client.post("/sign-in", data={"username": "carol", "password": password, "csrf_token": token,
                                                   "next": "/users"}, allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/users"


async def test_create_service_account_redirects_to_its_page(admin: World) -> None:
    _, location = await post(admin, "/users", {"name": "robot", "kind": "service"})
    assert location == "/users/robot?done=user-created"
    text = await get(admin, location)
    assert "User created." in text and "Service account" in text and "Reset password" not in text


@pytest.mark.parametrize(("data", "status", "words"), [
    ({"name": "", "kind": "user"}, 400, "Enter a name."),
    ({"name": "x" * 129, "kind": "user"}, 400, "at most 128 characters"),
    ({"name": "dave", "kind": "robot"}, 400, "Choose User or Service account."),
    ({"name": "alice", "kind": "user"}, 409, "A principal named &#39;alice&#39; already exists."),
    ({"name": "-bad name", "kind": "user"}, 400, "Name must be 1-128 characters"),
    ({"name": "dave", "kind": "user", "groups": "nope"}, 404, "No group named &#39;nope&#39;"),
])
async def test_create_user_errors_are_shown_next_to_the_field(admin: World, data: dict[str, str], status: int,
                                                              words: str) -> None:
    text, _ = await post(admin, "/users", data, status)
    assert words in text and 'class="field-error"' in text
    assert "Traceback" not in text


async def test_disable_suspends_credentials_and_enable_restores(admin: World) -> None:
    await admin.credential("bob", kind="key", name="bob-key")
    _, location = await post(admin, "/users/bob/disable", {"back": "/users"})
    assert location == "/users?done=user-disabled"
    assert "their credentials are suspended" in await get(admin, location)
    text = await get(admin, "/users/bob")
    assert "Disabled" in text and text.count(">Suspended</span>") == 2 and ">Valid<" not in text
    _, location = await post(admin, "/users/bob/enable", {})
    assert location == "/users/bob?done=user-enabled"
    text = await get(admin, location)
    assert ">Suspended<" not in text and text.count(">Valid</span>") == 2


async def test_administrator_cannot_disable_themselves(admin: World) -> None:
    text, _ = await post(admin, "/users/root/disable", {}, 409)
    assert "you cannot disable your own account" in text


async def test_reset_password_shows_the_new_one_once(admin: World) -> None:
    assert "Reset the password of alice?" in await get(admin, "/users/alice/reset-password")
    text, _ = await post(admin, "/users/alice/reset-password", {}, 200)
    password = field(text, "password-value")
    assert password != PASSWORDS["alice"] and "Password reset" in text
    reply = await admin.call("POST", "/api/v1/session", body={"username": "alice", "password": password})
    assert reply.status == 200


async def test_delete_user_needs_the_name_typed(admin: World) -> None:
    page = await get(admin, "/users/bob/delete")
    assert 'data-confirm="bob"' in page and "Type <code>bob</code> to confirm" in page
    text, _ = await post(admin, "/users/bob/delete", {"confirm": "bo"}, 400)
    assert "Type bob exactly to confirm." in text
    _, location = await post(admin, "/users/bob/delete", {"confirm": "bob"})
    assert location == "/users?done=user-deleted"
    text = await get(admin, "/users/bob", 404)
    assert "no user or service account named" in text


async def test_groups_create_members_and_delete(admin: World) -> None:
    text, _ = await post(admin, "/groups", {"name": "", "description": ""}, 400)
    assert "Enter a group name." in text
    text, _ = await post(admin, "/groups", {"name": "ops"}, 409)
    assert "A group named &#39;ops&#39; already exists." in text
    _, location = await post(admin, "/groups", {"name": "billing", "description": "Billing team"})
    assert location == "/groups/billing?done=group-created"
    assert "Billing team" in await get(admin, "/groups")
    _, location = await post(admin, "/groups/billing/members", {"member": "svc"})
    assert location == "/groups/billing?done=member-added"
    text = await get(admin, location)
    assert "Member added." in text and "Remove svc from billing" in text
    text, _ = await post(admin, "/groups/billing/members", {"member": "nobody"}, 404)
    assert "No user or service account named &#39;nobody&#39;" in text and 'id="member-error"' in text
    _, location = await post(admin, "/groups/billing/members/svc/remove", {})
    assert location == "/groups/billing?done=member-removed"
    assert "No members yet." in await get(admin, location)
    text, _ = await post(admin, "/groups/billing/delete", {"confirm": "nope"}, 400)
    assert "Type billing exactly to confirm." in text
    _, location = await post(admin, "/groups/billing/delete", {"confirm": "billing"})
    assert location == "/groups?done=group-deleted"
    assert "There is no group named &#39;billing&#39;." in await get(admin, "/groups/billing", 404)


async def test_api_account_for_a_group_shows_its_secret_once(admin: World) -> None:
    page = await get(admin, "/api-accounts/new?group=ops")
    assert '<option value="ops" selected>' in page
    text, _ = await post(admin, "/api-accounts/new", {"name": "ops-bot", "group": "ops", "expires_in_days": "30"}, 201)
    for words in ("Copy your secret now", "You will not be able to see this secret again", "I have copied the secret",
                  "curl ", 'data-enables="secret-close"'):
        assert words in text
    client_id, secret = field(text, "secret-client-id"), field(text, "secret-secret")
    async with admin.pool.acquire() as conn:
        row = await lifecycle.get_principal(conn, "ops-bot")
        assert row["kind"] == "service"
        credentials, _ = await lifecycle.list_credentials(conn, owner_id=row["id"])
    assert [c["client_id"] for c in credentials] == [client_id]
    page = await get(admin, "/users/ops-bot")
    assert secret not in page and client_id in page and "ops" in page


@pytest.mark.parametrize(("data", "status", "words"), [
    ({"name": "", "group": "", "expires_in_days": "0"}, 400, "Choose the permission group"),
    ({"name": "x", "group": "ops", "expires_in_days": "soon"}, 400, "Enter a whole number of days"),
    ({"name": "x", "group": "ops", "expires_in_days": "9999"}, 400, "Expiry exceeds the policy maximum"),
    ({"name": "x", "group": "ops", "expires_in_days": "5", "never": "yes"}, 400, "never expire are not allowed"),
    ({"name": "x", "group": "nope", "expires_in_days": "5"}, 404, "No group named &#39;nope&#39;"),
    ({"name": "alice", "group": "ops", "expires_in_days": "5"}, 409, "already exists"),
])
async def test_api_account_errors(admin: World, data: dict[str, str], status: int, words: str) -> None:
    text, _ = await post(admin, "/api-accounts/new", data, status)
    assert words in text and 'class="field-error"' in text
    async with admin.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM principals WHERE name = 'x'") == 0


async def test_audit_filters_and_pages(admin: World) -> None:
    await post(admin, "/groups", {"name": "audited"})
    await post(admin, "/groups/audited/members", {"member": "bob"})
    text = await get(admin, "/audit")
    assert text.index(ADD_MEMBER) < text.index(CREATE_GROUP) < text.index(CREATE_USER)  # newest first
    text = await get(admin, "/audit?actor=root&action=group.create")
    assert "audited" in text and ADD_MEMBER not in text and CREATE_USER not in text
    text = await get(admin, "/audit?target=audited")
    assert CREATE_GROUP in text and ADD_MEMBER in text and CREATE_USER not in text
    assert "No events match these filters." in await get(admin, "/audit?from=2999-01-01")
    assert CREATE_GROUP in await get(admin, "/audit?from=2000-01-01T00:00&to=2999-01-01")
    text = await get(admin, "/audit?from=yesterday", 400)
    assert "Enter a date and time" in text
    text = await get(admin, "/audit?from=2030-01-02&to=2030-01-01", 400)
    assert "The end of the range must be after its start." in text
    assert "This page link is not valid" in await get(admin, "/audit?cursor=abc", 400)


async def test_audit_pages_run_backwards(admin: World) -> None:
    hash_secret = lifecycle.secret_hasher(admin.settings.argon2)
    for i in range(55):
        await lifecycle.create_principal(admin.pool, lifecycle.cli_actor(), hash_secret, f"bulk{i}", service=True)
    text = await get(admin, "/audit?action=principal.create")
    older = re.search(r'href="(/audit\?action=principal.create&amp;cursor=\d+)">Older', text)
    assert older is not None and "bulk54" in text and "bulk0<" not in text
    text = await get(admin, html.unescape(older.group(1)))
    assert "bulk0" in text and "Newest" in text and "Older" not in text


async def test_names_that_look_like_markup_are_escaped(admin: World) -> None:
    evil = "<script>alert(1)</script>"
    await lifecycle.create_group(admin.pool, lifecycle.cli_actor(), "x-ss", evil)
    text, _ = await post(admin, "/users", {"name": evil, "kind": "user"}, 400)
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    text = await get(admin, "/groups")
    assert "<script>alert" not in text and "&lt;script&gt;" in text
    text = await get(admin, "/audit?target=x-ss")  # the description is in the event's changes
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    text = await get(admin, "/audit?actor=%3Cscript%3Ealert(1)%3C/script%3E")
    assert "<script>alert" not in text and 'value="&lt;script&gt;alert(1)&lt;/script&gt;"' in text

