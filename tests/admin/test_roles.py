"""The role matrix: every admin API endpoint as admin, as a self-service user on their own and on another's
object, as a service-account credential (on another's object) and anonymously, with the status each gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from tests.admin.world import PASSWORDS, World, unique, world

__all__ = ["world"]

CALLERS = ("admin", "own", "other", "service", "anon")
# Who authenticates in each column, and whose objects the column acts on.
AUTH = {"admin": "root", "own": "alice", "other": "alice", "service": "svc", "anon": None}
TARGET_OWNER = {"admin": "alice", "own": "alice", "other": "bob", "service": "bob", "anon": "alice"}
SKIP = None


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    expected: tuple[int | None, ...]  # one status per CALLERS entry; None: not applicable
    body: Any = None


def admin_only(method: str, path: str, ok: int, body: Any = None) -> Row:
    return Row(method, path, (ok, 403, 403, 403, 401), body)


ROWS = [
    Row("GET", "/api/v1/openapi.json", (200, 200, 200, 200, 200)),
    Row("GET", "/api/v1/health", (200, 200, 200, 200, 200)),
    Row("POST", "/api/v1/session", (200, 200, SKIP, 401, 401), {"username": "{login}", "password": "{password}"}),
    Row("GET", "/api/v1/session", (200, 200, 200, 200, 401)),
    Row("DELETE", "/api/v1/session", (400, 400, 400, 400, 401)),  # a bearer caller has no session to end
    Row("PUT", "/api/v1/me/password", (204, 204, SKIP, 400, 401),
        {"current_password": "{password}", "new_password": "a-brand-new-password"}),
    admin_only("GET", "/api/v1/users", 200),
    admin_only("POST", "/api/v1/users", 201, {"name": "{fresh}"}),
    admin_only("GET", "/api/v1/users/{victim}", 200),
    admin_only("DELETE", "/api/v1/users/{victim}", 204),
    admin_only("POST", "/api/v1/users/{victim}/disable", 200),
    admin_only("POST", "/api/v1/users/{victim}/enable", 200),
    admin_only("POST", "/api/v1/users/{victim}/password", 200),
    admin_only("GET", "/api/v1/groups", 200),
    admin_only("POST", "/api/v1/groups", 201, {"name": "{fresh}"}),
    admin_only("GET", "/api/v1/groups/{group}", 200),
    admin_only("DELETE", "/api/v1/groups/{group}", 204),
    admin_only("PUT", "/api/v1/groups/{group}/members/{victim}", 204),
    admin_only("DELETE", "/api/v1/groups/{group}/members/{victim}", 204),
    Row("GET", "/api/v1/credentials?owner={owner}", (200, 200, 403, 403, 401)),
    Row("POST", "/api/v1/credentials", (201, 201, 403, 403, 401), {"kind": "token", "owner": "{owner}"}),
    Row("GET", "/api/v1/credentials/{cred}", (200, 200, 404, 404, 401)),
    Row("PATCH", "/api/v1/credentials/{cred}", (200, 200, 404, 404, 401), {"name": "renamed"}),
    Row("DELETE", "/api/v1/credentials/{cred}", (204, 204, 404, 404, 401)),
    Row("POST", "/api/v1/credentials/{cred}/rotate", (200, 200, 404, 404, 401), {"grace_seconds": 0}),
    Row("GET", "/api/v1/credentials/{cred}/usage", (200, 200, 404, 404, 401)),
    admin_only("GET", "/api/v1/audit", 200),
]


def fill(template: Any, values: dict[str, str]) -> Any:
    if isinstance(template, str):
        return template.format(**values)
    if isinstance(template, dict):
        return {k: fill(v, values) for k, v in template.items()}
    return template


async def targets(world: World, caller: str) -> dict[str, str]:
    """Fresh objects for one call, so a destructive call never affects the next column."""
    owner = TARGET_OWNER[caller]
    victim, group = unique("victim"), unique("group")
    await world.principal(victim, password="victim-password-1")
    await world.group(group)
    cred = await world.credential(owner)
    login = {"admin": "root", "own": "alice", "service": "svc"}.get(caller, "alice")
    password = PASSWORDS.get(login, "not-the-password") if caller != "anon" else "wrong-password-123"
    return {"owner": owner, "victim": victim, "group": group, "cred": cred.credential["id"],
            "fresh": unique("fresh"), "login": login, "password": password}


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.method} {r.path}" for r in ROWS])
async def test_role_matrix(world: World, row: Row) -> None:
    got: dict[str, int] = {}
    want: dict[str, int] = {}
    for caller, expected in zip(CALLERS, row.expected, strict=True):
        if expected is None:
            continue
        values = await targets(world, caller)
        reply = await world.call(row.method, fill(row.path, values), AUTH[caller], body=fill(row.body, values))
        got[caller], want[caller] = reply.status, expected
        if reply.status >= 400:
            assert set(reply.body) == {"error", "message", "fields"}, reply.text
    assert got == want


async def test_self_service_cannot_move_a_credential_to_another_owner(world: World) -> None:
    mine = await world.credential("alice")
    reply = await world.call("PATCH", f"/api/v1/credentials/{mine.credential['id']}", "alice", {"owner": "bob"})
    assert reply.status == 403
    reply = await world.call("PATCH", f"/api/v1/credentials/{mine.credential['id']}", "root", {"owner": "bob"})
    assert reply.status == 200 and reply.body["owner"] == "bob"
    # now it is bob's: alice no longer sees it at all
    assert (await world.call("GET", f"/api/v1/credentials/{mine.credential['id']}", "alice")).status == 404


async def test_self_service_lists_only_their_own(world: World) -> None:
    made = await world.credential("root")  # an admin-made credential mapped to alice is hers too
    await world.call("PATCH", f"/api/v1/credentials/{made.credential['id']}", "root", {"owner": "alice"})
    reply = await world.call("GET", "/api/v1/credentials", "alice")
    assert reply.status == 200
    assert {c["owner"] for c in reply.body["items"]} == {"alice"}
    assert made.credential["id"] in {c["id"] for c in reply.body["items"]}


async def test_service_account_manages_its_own_credentials(world: World) -> None:
    mine = await world.credential("svc")
    reply = await world.call("POST", f"/api/v1/credentials/{mine.credential['id']}/rotate", "svc", {})
    assert reply.status == 200 and reply.body["token"] != mine.token
    reply = await world.call("POST", "/api/v1/credentials", "svc", {"kind": "key", "name": "second"})
    assert reply.status == 201 and reply.body["owner"] == "svc"


async def test_admin_cannot_lock_themselves_out(world: World) -> None:
    assert (await world.call("POST", "/api/v1/users/root/disable", "root")).status == 409
    assert (await world.call("DELETE", "/api/v1/users/root", "root")).status == 409
