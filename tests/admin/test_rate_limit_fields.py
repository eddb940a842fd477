"""Per-credential rate limits and quotas on the admin side (issue 14): the lifecycle, the JSON API, the CLI and
the web forms accept, check, store, audit and show `rate_limit` and `quota`, and a change reaches the gateways
through the change notification."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import asyncpg
import pytest

from admin import lifecycle
from admin.credential_limits import KEEP
from gateway.core import store
from tests.admin.test_cli import run, run_json
from tests.admin.test_ui_credentials import credential_row, get, post, sign_in
from tests.admin.world import World, world

__all__ = ["world"]

RATE_EXPECTED = "expected N/second or N/minute or N/hour"
QUOTA_EXPECTED = "expected N/day or N/month"


async def audit_changes(world: World, public_id: str, action: str) -> list[dict[str, Any]]:
    rows = await world.pool.fetch("SELECT changes FROM audit_events WHERE target = $1 AND action = $2 ORDER BY id",
                                  public_id, action)
    return [json.loads(r["changes"]) if isinstance(r["changes"], str) else dict(r["changes"]) for r in rows]


async def create(world: World, rate_limit: str | None = None, quota: str | None = None) -> str:
    issued = await lifecycle.create_credential(
        world.pool, lifecycle.cli_actor(), lifecycle.secret_hasher(world.settings.argon2), world.settings.policy,
        owner="alice", kind="token", name="limited", rate_limit=rate_limit, quota=quota)
    public_id: str = issued.credential["id"]
    return public_id


# --- the lifecycle ----------------------------------------------------------------------------------------------


async def test_lifecycle_stores_canonical_limits_keeps_clears_and_audits(world: World) -> None:
    public_id = await create(world, rate_limit=" 100/minute ", quota="100000/month")
    row = await credential_row(world, public_id)
    assert (row["rate_limit"], row["quota"]) == ("100/minute", "100000/month")
    shown = lifecycle.public_credential(row)
    assert (shown["rate_limit"], shown["quota"]) == ("100/minute", "100000/month")
    [created] = await audit_changes(world, public_id, "credential.create")
    assert (created["rate_limit"], created["quota"]) == ("100/minute", "100000/month")

    update = lifecycle.update_credential
    actor, policy = lifecycle.cli_actor(), world.settings.policy
    changed = await update(world.pool, actor, policy, public_id, rate_limit="5/second")
    assert (changed["rate_limit"], changed["quota"]) == ("5/second", "100000/month")  # quota not given: kept
    changed = await update(world.pool, actor, policy, public_id, quota="none")
    assert (changed["rate_limit"], changed["quota"]) == ("5/second", None)
    changed = await update(world.pool, actor, policy, public_id, rate_limit=None, quota=KEEP, name="renamed")
    assert (changed["rate_limit"], changed["quota"], changed["name"]) == (None, None, "renamed")
    changes = await audit_changes(world, public_id, "credential.update")
    assert changes == [
        {"rate_limit": {"before": "100/minute", "after": "5/second"}},
        {"quota": {"before": "100000/month", "after": None}},
        {"name": {"before": "limited", "after": "renamed"}, "rate_limit": {"before": "5/second", "after": None}},
    ]
    unlimited = await create(world)
    row = await credential_row(world, unlimited)
    assert (row["rate_limit"], row["quota"]) == (None, None)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rate_limit", "100/day", RATE_EXPECTED),  # a quota's unit is no rate
    ("rate_limit", "fast", RATE_EXPECTED),
    ("rate_limit", "0/second", "N must be between 1 and 999,999,999"),
    ("quota", "100/minute", QUOTA_EXPECTED),
    ("quota", "1000000000/month", "N must be between 1 and 999,999,999"),
    ("quota", "9" * 100, "at most 32 characters, e.g. 100000/month"),
])
async def test_lifecycle_refuses_a_bad_value_naming_the_field(world: World, field: str, value: str,
                                                             message: str) -> None:
    before = await world.pool.fetchval("SELECT count(*) FROM credentials")
    with pytest.raises(lifecycle.LifecycleError) as refused:
        await create(world, **{field: value})
    assert refused.value.field == field and message in refused.value.message and refused.value.status == 400
    assert await world.pool.fetchval("SELECT count(*) FROM credentials") == before
    public_id = await create(world, rate_limit="7/hour", quota="70/day")
    with pytest.raises(lifecycle.LifecycleError) as refused:
        await lifecycle.update_credential(world.pool, lifecycle.cli_actor(), world.settings.policy, public_id,
                                          rate_limit=value if field == "rate_limit" else KEEP,
                                          quota=value if field == "quota" else KEEP)
    assert refused.value.field == field and message in refused.value.message
    row = await credential_row(world, public_id)
    assert (row["rate_limit"], row["quota"]) == ("7/hour", "70/day")


# --- the JSON API -----------------------------------------------------------------------------------------------


async def test_api_creates_patches_clears_and_shows_limits(world: World) -> None:
    created = await world.call("POST", "/api/v1/credentials", "root",
                               {"kind": "key", "owner": "svc", "rate_limit": "100/minute", "quota": "100000/month"})
    assert created.status == 201, created.text
    assert (created.body["rate_limit"], created.body["quota"]) == ("100/minute", "100000/month")
    path = f"/api/v1/credentials/{created.body['id']}"
    shown = await world.call("GET", path, "root")
    assert (shown.body["rate_limit"], shown.body["quota"]) == ("100/minute", "100000/month")
    assert (await world.call("GET", path, "svc")).body["rate_limit"] == "100/minute"  # the owner sees it too

    patched = await world.call("PATCH", path, "root", {"rate_limit": "10/second"})
    assert patched.status == 200 and (patched.body["rate_limit"], patched.body["quota"]) == ("10/second",
                                                                                             "100000/month")
    assert (await world.call("PATCH", path, "root", {"name": "x"})).body["rate_limit"] == "10/second"  # kept
    cleared = await world.call("PATCH", path, "root", {"rate_limit": None, "quota": "none"})
    assert cleared.status == 200 and (cleared.body["rate_limit"], cleared.body["quota"]) == (None, None)
    listed = await world.call("GET", "/api/v1/credentials?owner=svc", "root")
    assert {(c["id"], c["rate_limit"], c["quota"]) for c in listed.body["items"]} >= {
        (created.body["id"], None, None)}
    assert all("rate_limit" in c and "quota" in c for c in listed.body["items"])
    [event] = await audit_changes(world, created.body["id"], "credential.create")
    assert event["rate_limit"] == "100/minute"
    updates = await audit_changes(world, created.body["id"], "credential.update")
    assert updates[-1] == {"rate_limit": {"before": "10/second", "after": None},
                           "quota": {"before": "100000/month", "after": None}}


@pytest.mark.parametrize(("body", "fields"), [
    ({"rate_limit": "100/month"}, {"rate_limit": RATE_EXPECTED}),
    ({"quota": "5/second"}, {"quota": QUOTA_EXPECTED}),
    ({"rate_limit": 100}, {"rate_limit": "a string of at most 32 characters"}),
    ({"rate_limit": "fast", "quota": "-1/day"}, {"rate_limit": RATE_EXPECTED, "quota": QUOTA_EXPECTED}),
])
async def test_api_refuses_bad_values_with_400_naming_the_field(world: World, body: dict[str, Any],
                                                                fields: dict[str, str]) -> None:
    created = await world.call("POST", "/api/v1/credentials", "root", {"kind": "token", **body})
    assert created.status == 400 and created.body["error"] == "invalid_request", created.text
    assert set(created.body["fields"]) == set(fields)
    assert all(text in created.body["fields"][name] for name, text in fields.items()), created.text
    path = f"/api/v1/credentials/{world.tokens['svc'][4:16]}"
    patched = await world.call("PATCH", path, "root", body)
    assert patched.status == 400 and set(patched.body["fields"]) == set(fields), patched.text
    shown = (await world.call("GET", path, "root")).body
    assert (shown["rate_limit"], shown["quota"]) == (None, None)


async def test_only_an_admin_changes_limits(world: World) -> None:
    own = f"/api/v1/credentials/{world.tokens['alice'][4:16]}"
    refused = await world.call("POST", "/api/v1/credentials", "alice", {"kind": "token", "rate_limit": "1/second"})
    assert refused.status == 403 and "rate_limit" in refused.body["message"]
    assert (await world.call("PATCH", own, "alice", {"quota": "none", "rate_limit": None})).status == 200  # as is
    assert (await world.call("PATCH", own, "root", {"quota": "10/day"})).status == 200
    lifted = await world.call("PATCH", own, "alice", {"quota": None})
    assert lifted.status == 403
    echoed = await world.call("PATCH", own, "alice", {"quota": "10/day", "name": "mine"})  # a GET sent back
    assert echoed.status == 200 and echoed.body["quota"] == "10/day"


async def test_a_limit_changed_through_the_api_is_notified_to_the_gateways(world: World) -> None:
    public_id = world.tokens["svc"][4:16]
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    listener = await asyncpg.connect(world.settings.database_url.reveal())
    await listener.add_listener(store.NOTIFY_CHANNEL, lambda *args: received.put_nowait(json.loads(args[3])))
    try:
        for change in ({"rate_limit": "50/second"}, {"quota": "9/day"}, {"rate_limit": None}):
            reply = await world.call("PATCH", f"/api/v1/credentials/{public_id}", "root", change)
            assert reply.status == 200, reply.text
            event = await asyncio.wait_for(received.get(), 5)
            assert (event["t"], event["id"]) == ("c", public_id)
    finally:
        await listener.close()


# --- the CLI ----------------------------------------------------------------------------------------------------


def test_cli_creates_and_updates_limits(env: dict[str, str]) -> None:
    run(env, "users", "create", "alice")
    created = run_json(env, "credentials", "create", "--owner", "alice", "--kind", "token",
                       "--rate-limit", "100/minute", "--quota", "100000/month")
    assert (created["rate_limit"], created["quota"]) == ("100/minute", "100000/month")
    public_id = created["id"]
    updated = run_json(env, "credentials", "update", public_id, "--rate-limit", "5/second")
    assert (updated["rate_limit"], updated["quota"]) == ("5/second", "100000/month")
    plain = run(env, "credentials", "update", public_id, "--quota", "none", "--name", "nightly").stdout
    assert f"updated {public_id} (--name, --quota); rate limit 5/second, quota none" in plain
    shown = run_json(env, "credentials", "show", public_id)
    assert (shown["rate_limit"], shown["quota"], shown["name"]) == ("5/second", None, "nightly")
    listing = run(env, "credentials", "list").stdout
    assert "rate_limit=5/second" in listing and "quota=-" in listing


@pytest.mark.parametrize(("args", "message"), [
    (("create", "--owner", "alice", "--kind", "token", "--rate-limit", "100/day"),
     f"credgate: --rate-limit: {RATE_EXPECTED} with N a whole number, e.g. 100/minute; got '100/day'"),
    (("create", "--owner", "alice", "--kind", "token", "--quota", "lots"), f"credgate: --quota: {QUOTA_EXPECTED}"),
    (("update", "{id}", "--quota", "10/minute"), f"credgate: --quota: {QUOTA_EXPECTED}"),
    (("update", "{id}",), "nothing to change: give at least one of --name, --owner, --expires-in, --rate-limit"),
])
def test_cli_refuses_a_bad_limit_naming_the_option(env: dict[str, str], args: tuple[str, ...], message: str) -> None:
    run(env, "users", "create", "alice")
    public_id = run_json(env, "credentials", "create", "--owner", "alice", "--kind", "token", "--quota", "1/day")["id"]
    proc = run(env, "credentials", *(a.format(id=public_id) for a in args), ok=False)
    assert proc.returncode == 1 and message in proc.stderr and proc.stdout == "", proc.stderr
    assert [c["quota"] for c in run_json(env, "credentials", "list")] == ["1/day"]  # nothing changed or added


# --- the web UI -------------------------------------------------------------------------------------------------


def error_beside(text: str, field: str) -> str:
    match = re.search(rf'id="cred-{field}-error" class="field-error">([^<]*)<', text)
    assert match is not None, text
    return match.group(1)


async def test_the_create_form_checks_and_saves_limits(world: World) -> None:
    csrf = await sign_in(world, "root")
    form = await get(world, "/credentials/new")
    assert '<label for="cred-rate_limit">Rate limit</label>' in form.text
    assert '<label for="cred-quota">Quota</label>' in form.text
    assert 'placeholder="100/minute"' in form.text and 'placeholder="100000/month"' in form.text
    assert form.text.count("Leave empty for no limit.") == 2
    bad = await post(world, "/credentials/new", {"name": "api", "kind": "token", "owner": "svc",
                                                 "rate_limit": "100/fortnight", "quota": "100000/month"}, csrf)
    assert bad.status == 400 and "Copy your secret now" not in bad.text
    assert error_beside(bad.text, "rate_limit").startswith(f"Rate limit: {RATE_EXPECTED}")
    assert 'id="cred-quota-error"' not in bad.text and 'value="100/fortnight"' in bad.text  # kept to correct
    good = await post(world, "/credentials/new", {"name": "api", "kind": "token", "owner": "svc",
                                                  "rate_limit": "100/minute", "quota": "100000/month"}, csrf)
    assert good.status == 201, good.text
    row = await world.pool.fetchrow("SELECT public_id, rate_limit, quota FROM credentials WHERE name = 'api'")
    assert row is not None
    assert (row["rate_limit"], row["quota"]) == ("100/minute", "100000/month")
    detail = await get(world, f"/credentials/{row['public_id']}")
    assert "<dt>Rate limit</dt><dd>100/minute</dd>" in detail.text
    assert "<dt>Quota</dt><dd>100000/month</dd>" in detail.text


async def test_the_edit_form_changes_and_clears_limits(world: World) -> None:
    public_id = world.tokens["svc"][4:16]
    csrf = await sign_in(world, "root")
    path = f"/credentials/{public_id}/edit"
    form = await get(world, path)
    assert form.status == 200 and 'name="rate_limit" value=""' in form.text
    base = {"name": "svc-script", "expires": (await credential_row(world, public_id))["expires_at"].date().isoformat()}
    bad = await post(world, path, {**base, "rate_limit": "10/second", "quota": "10/hour"}, csrf)
    assert bad.status == 400 and error_beside(bad.text, "quota").startswith(f"Quota: {QUOTA_EXPECTED}")
    assert 'id="cred-rate_limit-error"' not in bad.text
    assert (await credential_row(world, public_id))["rate_limit"] is None  # nothing saved
    saved = await post(world, path, {**base, "rate_limit": "10/second", "quota": "10/day"}, csrf)
    assert (saved.status, saved.location) == (303, "/credentials?done=updated")
    row = await credential_row(world, public_id)
    assert (row["rate_limit"], row["quota"]) == ("10/second", "10/day")
    assert 'name="rate_limit" value="10/second"' in (await get(world, path)).text
    detail = await get(world, f"/credentials/{public_id}")
    assert "<dt>Rate limit</dt><dd>10/second</dd>" in detail.text and "<dt>Quota</dt><dd>10/day</dd>" in detail.text
    cleared = await post(world, path, {**base, "rate_limit": "", "quota": "10/day"}, csrf)
    assert cleared.status == 303
    detail = await get(world, f"/credentials/{public_id}")
    assert "<dt>Rate limit</dt><dd>None</dd>" in detail.text and "<dt>Quota</dt><dd>10/day</dd>" in detail.text


async def test_a_self_service_user_sees_but_cannot_change_limits(world: World) -> None:
    public_id = world.tokens["alice"][4:16]
    await lifecycle.update_credential(world.pool, lifecycle.cli_actor(), world.settings.policy, public_id,
                                      rate_limit="3/second")
    csrf = await sign_in(world, "alice")
    assert 'name="rate_limit"' not in (await get(world, "/credentials/new")).text
    form = await get(world, f"/credentials/{public_id}/edit")
    assert 'name="rate_limit"' not in form.text and "3/second" in form.text
    page = await post(world, f"/credentials/{public_id}/edit", {"name": "alice-script", "rate_limit": ""}, csrf)
    assert page.status == 303
    assert (await credential_row(world, public_id))["rate_limit"] == "3/second"  # a forged field is ignored
