"""admin.ui.credentials: the list (filters, pages), create and the once-only secret, rotate, edit, delete,
the detail page, and that nobody sees or acts on another user's credential."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from datetime import timedelta

import pytest

from admin import lifecycle
from gateway.core import formats, store
from tests.admin.world import PASSWORDS, World, world

__all__ = ["world"]

HIDDEN_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
XSS = "<img src=x onerror=alert(1)>"


@dataclass
class Page:
    status: int
    text: str
    location: str


async def sign_in(world: World, who: str) -> str:
    """Sign in through the form; returns the session's CSRF token (from a page's hidden field)."""
    async with world.client.get("/sign-in") as resp:
        match = HIDDEN_TOKEN.search(await resp.text())
    assert match is not None
    fields = {"username": who, "password": PASSWORDS[who], "csrf_token": match.group(1), "next": "/credentials"}
    async with world.client.post("/sign-in", data=fields, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
    page = await get(world, "/credentials")
    match = HIDDEN_TOKEN.search(page.text)
    assert page.status == 200 and match is not None
    return match.group(1)


async def get(world: World, path: str) -> Page:
    async with world.client.get(path, allow_redirects=False) as resp:
        return Page(resp.status, await resp.text(), resp.headers.get("Location", ""))


async def post(world: World, path: str, fields: dict[str, str], csrf: str | None) -> Page:
    data = {**fields, **({"csrf_token": csrf} if csrf is not None else {})}
    async with world.client.post(path, data=data, allow_redirects=False) as resp:
        return Page(resp.status, await resp.text(), resp.headers.get("Location", ""))


async def credential_row(world: World, public_id: str) -> store.Record:
    async with world.pool.acquire() as conn:
        return await lifecycle.get_credential(conn, public_id)


def field_value(text: str, field_id: str) -> str:
    match = re.search(rf'id="{field_id}"[^>]*value="([^"]*)"', text)
    assert match is not None, field_id
    return html.unescape(match.group(1))


# --- the list -------------------------------------------------------------------------------------------------


async def test_my_credentials_lists_only_mine_with_kind_identifier_and_status(world: World) -> None:
    key = await world.credential("alice", kind="key", name="alice-key")
    assert key.client_id is not None
    old = await world.credential("alice", name="alice-old")
    await lifecycle.revoke_credential(world.pool, lifecycle.cli_actor(), old.credential["id"])
    await sign_in(world, "alice")
    page = await get(world, "/credentials")
    assert page.status == 200
    assert "alice-script" in page.text and "alice-key" in page.text
    assert "bob-script" not in page.text and "Owner" not in page.text
    assert "Token" in page.text and "Key pair" in page.text and key.client_id in page.text
    token_id = world.tokens["alice"].split("_")[1][:formats.PUBLIC_ID_LENGTH]
    assert f"cgt_{token_id}" in page.text and world.tokens["alice"] not in page.text
    assert '<span class="badge badge-valid">Valid</span>' in page.text
    assert "alice-old" not in page.text  # revoked: hidden unless a filter asks
    assert "Create credential" in page.text and "Rotate secret" in page.text

    revoked = await get(world, "/credentials?status=revoked")
    assert "alice-old" in revoked.text and "alice-key" not in revoked.text
    assert '<span class="badge badge-revoked">Revoked</span>' in revoked.text
    assert "Rotate secret" not in revoked.text and "/delete" not in revoked.text  # revoked: no actions
    everything = await get(world, "/credentials?status=all")
    assert all(name in everything.text for name in ("alice-old", "alice-key", "alice-script"))


@pytest.mark.parametrize(("query", "shown", "hidden"), [
    ("kind=key", ["alice-key"], ["alice-script", "Deploy bot"]),
    ("kind=token", ["alice-script", "Deploy bot"], ["alice-key"]),
    ("q=deploy", ["Deploy bot"], ["alice-script", "alice-key"]),
    ("q=100%25", [], ["alice-script", "alice-key", "Deploy bot"]),  # LIKE wildcards are literal
    ("status=expired", [], ["alice-script"]),
    ("status=bogus&kind=bogus", ["alice-script", "alice-key"], []),  # unknown values: the default view
])
async def test_filters_by_kind_text_and_status(world: World, query: str, shown: list[str], hidden: list[str]) -> None:
    await world.credential("alice", kind="key", name="alice-key")
    await world.credential("alice", name="Deploy bot")
    await sign_in(world, "alice")
    page = await get(world, "/credentials?" + query)
    assert page.status == 200
    assert all(name in page.text for name in shown), query
    assert not any(f">{name}<" in page.text for name in hidden), query


async def test_search_finds_a_key_pair_by_its_client_id(world: World) -> None:
    key = await world.credential("alice", kind="key", name="alice-key")
    assert key.client_id is not None
    await sign_in(world, "alice")
    for text in (key.client_id, key.client_id[:10]):
        page = await get(world, "/credentials?q=" + text)
        assert "alice-key" in page.text and "alice-script" not in page.text


async def test_expiring_credentials_say_expires_soon(world: World) -> None:
    soon = await lifecycle.create_credential(
        world.pool, lifecycle.cli_actor(), lifecycle.secret_hasher(world.settings.argon2), world.settings.policy,
        owner="alice", kind="token", name="short-lived", expires_in_days=2)
    await sign_in(world, "alice")
    page = await get(world, "/credentials?status=expires-soon")
    assert "short-lived" in page.text and "alice-script" not in page.text
    assert '<span class="badge badge-expires-soon">Expires soon</span>' in page.text
    detail = await get(world, f"/credentials/{soon.credential['id']}")
    assert "Expires soon" in detail.text


async def test_administrators_see_every_credential_with_its_owner(world: World) -> None:
    await sign_in(world, "root")
    page = await get(world, "/credentials")
    assert ">Owner<" in page.text
    assert all(f"{who}-script" in page.text for who in ("root", "alice", "bob", "svc"))


async def test_thousands_of_rows_are_paged_by_keyset(world: World) -> None:
    owner = await credential_row(world, world.tokens["alice"][4:16])
    async with world.pool.acquire() as conn:
        secret_hash = await conn.fetchval("SELECT secret_hash FROM credentials WHERE id = $1", owner["id"])
        rows = [(formats.new_public_id(), "token", secret_hash, f"bulk-{i:03d}", owner["owner_id"], None, "test",
                 None, None, None) for i in range(120)]
        await conn.executemany(store.INSERT_CREDENTIAL, rows)  # type: ignore[attr-defined]
    await sign_in(world, "alice")
    first = await get(world, "/credentials")
    assert "bulk-119" in first.text and "bulk-070" in first.text and "bulk-069" not in first.text
    assert "Previous" not in first.text
    second = await get(world, html.unescape(re.findall(r'href="([^"]+)" rel="next"', first.text)[0]))
    assert "bulk-069" in second.text and "bulk-020" in second.text and "bulk-070" not in second.text
    third = await get(world, html.unescape(re.findall(r'href="([^"]+)" rel="next"', second.text)[0]))
    assert "bulk-000" in third.text and "alice-script" in third.text and "Next page" not in third.text
    back = await get(world, html.unescape(re.findall(r'href="([^"]+)" rel="prev"', third.text)[0]))
    assert re.findall(r"bulk-\d+", back.text) == re.findall(r"bulk-\d+", second.text)
    filtered = await get(world, "/credentials?q=bulk-11")
    assert len(re.findall(r">bulk-11\d<", filtered.text)) == 10 and "Next page" not in filtered.text


# --- create and the secret ------------------------------------------------------------------------------------


async def test_the_create_form_follows_the_policy(world: World) -> None:
    await sign_in(world, "alice")
    page = await get(world, "/credentials/new")
    assert page.status == 200 and '<dialog open class="static" data-modal' in page.text
    today = lifecycle.now_utc().date()
    policy = world.settings.policy
    assert f'value="{(today + timedelta(days=policy.default_expiry_days)).isoformat()}"' in page.text
    assert f'max="{(today + timedelta(days=policy.max_expiry_days)).isoformat()}"' in page.text
    assert 'type="date"' in page.text and ">Never<" not in page.text  # the default policy forbids it
    assert 'name="owner"' not in page.text  # only administrators choose an owner
    admin_page = (await sign_in(world, "root"), await get(world, "/credentials/new"))[1]
    assert 'name="owner"' in admin_page.text and '<option value="svc">svc</option>' in admin_page.text


async def test_create_shows_the_secret_once_and_never_again(world: World) -> None:
    csrf = await sign_in(world, "alice")
    page = await post(world, "/credentials/new", {"name": "ci", "kind": "token", "expires": ""}, csrf)
    assert page.status == 201
    assert "Copy your secret now" in page.text and "You will not be able to see this secret again" in page.text
    assert "I have copied the secret" in page.text and 'data-enables="secret-close"' in page.text
    assert 'name="done" value="created"' in page.text and ">Copy<" in page.text
    token = field_value(page.text, "secret-token")
    assert formats.parse_token(token) is not None
    assert f'Authorization: Bearer {token}' in html.unescape(page.text)
    assert world.settings.gateway_url in page.text
    row = await credential_row(world, token[4:16])
    assert row["name"] == "ci" and row["owner_name"] == "alice"
    after = await get(world, "/credentials?done=created")
    assert "Credential created." in after.text and "ci" in after.text and token not in after.text
    detail = await get(world, f"/credentials/{row['public_id']}")
    assert token not in detail.text


async def test_a_key_pair_shows_client_id_and_secret_with_basic_auth_example(world: World) -> None:
    csrf = await sign_in(world, "alice")
    page = await post(world, "/credentials/new", {"name": "pair", "kind": "key"}, csrf)
    assert page.status == 201
    client_id, secret = field_value(page.text, "secret-client-id"), field_value(page.text, "secret-secret")
    assert formats.parse_key_pair(client_id, secret) is not None
    assert f"-u {client_id}:{secret}" in page.text and page.text.count(">Copy<") == 2
    assert secret not in (await get(world, "/credentials")).text


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"name": "", "kind": "token"}, "name", "Name: enter a name"),
    ({"name": "x", "kind": "password"}, "kind", "Kind: choose Token or Key pair"),
    ({"name": "x", "kind": "token", "expires": "31/01/2030"}, "expires", "Expires: enter a date"),
    ({"name": "x", "kind": "token", "expires": "2999-01-01"}, "expires",
     "Expires: expiry exceeds the policy maximum of 365 days"),
    ({"name": "x", "kind": "token", "expires": "2001-01-01"}, "expires", "Expires: choose a date after today"),
    ({"name": "x", "kind": "token", "never": "on"}, "expires",
     "Expires: credentials that never expire are not allowed by policy"),
    ({"name": "x" * 201, "kind": "token"}, "name", "Name: name must be at most 200 characters"),
])
async def test_invalid_create_rerenders_the_form_naming_the_field(world: World, fields: dict[str, str], field: str,
                                                                  message: str) -> None:
    csrf = await sign_in(world, "alice")
    page = await post(world, "/credentials/new", fields, csrf)
    assert page.status == 400
    assert re.search(rf'id="cred-{field}-error" class="field-error">[^<]*{re.escape(message)}', page.text), page.text
    assert "Copy your secret now" not in page.text
    async with world.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM credentials WHERE owner_id = "
                                   "(SELECT id FROM principals WHERE name = 'alice')") == 1


async def test_administrators_create_for_another_owner(world: World) -> None:
    csrf = await sign_in(world, "root")
    page = await post(world, "/credentials/new", {"name": "for-svc", "kind": "key", "owner": "svc"}, csrf)
    assert page.status == 201
    row = await credential_row(world, field_value(page.text, "secret-client-id")[4:16])
    assert row["owner_name"] == "svc" and row["created_by"] == "root"
    unknown = await post(world, "/credentials/new", {"name": "x", "kind": "key", "owner": "nobody"}, csrf)
    assert unknown.status == 400 and 'id="cred-owner-error"' in unknown.text


async def test_a_self_service_user_cannot_create_for_someone_else(world: World) -> None:
    csrf = await sign_in(world, "alice")
    page = await post(world, "/credentials/new", {"name": "sneaky", "kind": "token", "owner": "bob"}, csrf)
    assert page.status == 201
    assert (await credential_row(world, field_value(page.text, "secret-token")[4:16]))["owner_name"] == "alice"


# --- rotate, edit, delete ------------------------------------------------------------------------------------


async def test_rotate_offers_when_the_old_secret_stops_and_shows_the_new_one(world: World) -> None:
    public_id = world.tokens["alice"][4:16]
    csrf = await sign_in(world, "alice")
    form = await get(world, f"/credentials/{public_id}/rotate")
    assert all(choice in form.text for choice in ("Now", "After 1 hour", "After 24 hours"))
    page = await post(world, f"/credentials/{public_id}/rotate", {"grace": "1h"}, csrf)
    assert page.status == 200 and "Copy your secret now" in page.text and 'value="rotated"' in page.text
    token = field_value(page.text, "secret-token")
    assert token != world.tokens["alice"] and token[4:16] == public_id
    row = await credential_row(world, public_id)
    assert row["previous_expires_at"] is not None
    assert row["previous_expires_at"] - lifecycle.now_utc() > timedelta(minutes=59)
    assert "Secret rotated." in (await get(world, "/credentials?done=rotated")).text
    bad = await post(world, f"/credentials/{public_id}/rotate", {"grace": "forever"}, csrf)
    assert bad.status == 400 and "Copy your secret now" not in bad.text


async def test_edit_changes_name_and_expiry_then_redirects_with_a_notice(world: World) -> None:
    public_id = world.tokens["alice"][4:16]
    before = await credential_row(world, public_id)
    csrf = await sign_in(world, "alice")
    form = await get(world, f"/credentials/{public_id}/edit")
    assert form.status == 200 and 'value="alice-script"' in form.text
    date_shown = field_value(form.text, "cred-expires")
    page = await post(world, f"/credentials/{public_id}/edit", {"name": "renamed", "expires": date_shown}, csrf)
    assert (page.status, page.location) == (303, "/credentials?done=updated")
    row = await credential_row(world, public_id)
    assert row["name"] == "renamed" and row["expires_at"] == before["expires_at"]  # untouched date: same expiry
    new_date = (lifecycle.now_utc() + timedelta(days=10)).date()
    await post(world, f"/credentials/{public_id}/edit", {"name": "renamed", "expires": new_date.isoformat()}, csrf)
    assert (await credential_row(world, public_id))["expires_at"].date() == new_date
    too_late = await post(world, f"/credentials/{public_id}/edit", {"name": "renamed", "expires": "2999-01-01"}, csrf)
    assert too_late.status == 400 and "policy maximum" in too_late.text
    assert "Changes saved." in (await get(world, "/credentials?done=updated")).text


async def test_delete_requires_the_typed_name_and_revokes(world: World) -> None:
    public_id = world.tokens["alice"][4:16]
    csrf = await sign_in(world, "alice")
    dialog = await get(world, f"/credentials/{public_id}/delete")
    assert 'data-confirm="alice-script"' in dialog.text and 'aria-labelledby="delete-title"' in dialog.text
    wrong = await post(world, f"/credentials/{public_id}/delete", {"confirm_name": "alice"}, csrf)
    assert wrong.status == 400 and "does not match" in wrong.text
    assert (await credential_row(world, public_id))["revoked_at"] is None
    page = await post(world, f"/credentials/{public_id}/delete", {"confirm_name": "alice-script"}, csrf)
    assert (page.status, page.location) == (303, "/credentials?done=deleted")
    assert (await credential_row(world, public_id))["revoked_at"] is not None
    assert "Credential deleted." in (await get(world, "/credentials?done=deleted")).text
    for action in ("rotate", "edit", "delete"):  # revoked credentials offer no actions
        assert (await get(world, f"/credentials/{public_id}/{action}")).status == 409


# --- detail -------------------------------------------------------------------------------------------------------


async def test_detail_shows_creator_usage_chart_and_audit_events(world: World) -> None:
    public_id = world.tokens["alice"][4:16]
    row = await credential_row(world, public_id)
    today = lifecycle.now_utc().date()
    async with world.pool.acquire() as conn:
        await store.write_usage(conn, {(row["id"], today): 7, (row["id"], today - timedelta(days=3)): 5,
                                       (row["id"], today - timedelta(days=40)): 100}, {})
    await lifecycle.update_credential(world.pool, lifecycle.cli_actor(), world.settings.policy, public_id,
                                      name="alice-renamed")
    await sign_in(world, "alice")
    page = await get(world, f"/credentials/{public_id}")
    assert page.status == 200
    assert 'role="img"' in page.text and "last 30 days: 12 in total" in page.text
    assert page.text.count('class="bar"') == 2 and f"{today.isoformat()}: 7 requests" in page.text
    assert "credential.create" in page.text and "credential.update" in page.text and "cli:" in page.text
    assert f"cgt_{public_id}" in page.text and "Created" in page.text


# --- who may see what, CSRF, escaping ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "suffix"), [
    ("GET", ""), ("GET", "/rotate"), ("GET", "/edit"), ("GET", "/delete"),
    ("POST", "/rotate"), ("POST", "/edit"), ("POST", "/delete"),
])
async def test_another_users_credential_is_not_found(world: World, method: str, suffix: str) -> None:
    bob_id = world.tokens["bob"][4:16]
    csrf = await sign_in(world, "alice")
    path = f"/credentials/{bob_id}{suffix}"
    if method == "GET":
        page = await get(world, path)
    else:
        page = await post(world, path, {"grace": "now", "name": "mine", "confirm_name": "bob-script"}, csrf)
    assert page.status == 404 and "Not found" in page.text and "bob-script" not in page.text
    row = await credential_row(world, bob_id)
    assert row["revoked_at"] is None and row["rotated_at"] is None and row["name"] == "bob-script"
    assert (await get(world, "/credentials/AAAAAAAAAAAA" + suffix)).status == 404  # same as a missing one


async def test_a_post_without_the_csrf_token_is_refused(world: World) -> None:
    public_id = world.tokens["alice"][4:16]
    await sign_in(world, "alice")
    page = await post(world, "/credentials/new", {"name": "forged", "kind": "token"}, None)
    assert page.status == 403 and "Copy your secret now" not in page.text
    forged = await post(world, f"/credentials/{public_id}/delete", {"confirm_name": "alice-script"}, "wrong")
    assert forged.status == 403
    assert (await credential_row(world, public_id))["revoked_at"] is None


async def test_user_supplied_names_are_escaped_everywhere(world: World) -> None:
    issued = await world.credential("alice", name=XSS)
    public_id = issued.credential["id"]
    await sign_in(world, "alice")
    for path in ("/credentials", f"/credentials/{public_id}", f"/credentials/{public_id}/edit",
                 f"/credentials/{public_id}/rotate", f"/credentials/{public_id}/delete", "/credentials?q=" + XSS):
        page = await get(world, path)
        assert page.status == 200, path
        assert XSS not in page.text and "&lt;img src=x onerror=alert(1)&gt;" in page.text, path


async def test_the_secret_page_is_never_cached(world: World) -> None:
    csrf = await sign_in(world, "alice")
    async with world.client.post("/credentials/new", data={"name": "n", "kind": "token", "csrf_token": csrf}) as resp:
        assert resp.status == 201
        assert resp.headers["Cache-Control"] == "no-store"
        assert "'unsafe-inline'" not in resp.headers["Content-Security-Policy"]
        text = await resp.text()
    assert "style=" not in text and "<script>" not in text and " on" + "click=" not in text
