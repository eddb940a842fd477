"""admin.lifecycle against a real Postgres: each change and its audit event in one transaction, rotation,
irreversible revocation, the expiry policy, and the error (code, status, field) of every refusal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from admin import lifecycle
from gateway.core import formats, hashing
from gateway.core.settings import PolicySettings, Settings
from gateway.core.store import Actor, Pool

ALICE_PASSWORD = "alice-password-0123"
UNKNOWN_ID = "AAAAAAAAAAAA"  # well-formed, never issued


@dataclass
class Scene:
    """A migrated database holding group ops, user alice, service account svc (in ops) and svc's token."""

    pool: Pool
    actor: Actor
    hash_secret: lifecycle.HashSecret
    settings: Settings
    token: lifecycle.IssuedSecret

    @property
    def token_id(self) -> str:
        token_id: str = self.token.credential["id"]
        return token_id

    async def last_audit_id(self) -> int:
        last: int = await self.pool.fetchval("SELECT coalesce(max(id), 0) FROM audit_events")
        return last

    async def audit_since(self, audit_id: int) -> list[Any]:
        """Audit events after `audit_id`, each with the id of the transaction that wrote it."""
        return list(await self.pool.fetch(
            "SELECT action, target_type, target, actor, changes, xmin::text AS tx FROM audit_events "
            "WHERE id > $1 ORDER BY id", audit_id))

    async def secret_hashes(self, public_id: str) -> Any:
        return await self.pool.fetchrow(
            "SELECT secret_hash, previous_secret_hash FROM credentials WHERE public_id = $1", public_id)


@pytest.fixture
async def scene(pool: Pool, settings: Settings) -> Scene:
    actor = lifecycle.cli_actor()
    hash_secret = lifecycle.secret_hasher(settings.argon2)
    await lifecycle.create_group(pool, actor, "ops", "operations")
    await lifecycle.create_principal(pool, actor, hash_secret, "alice", password=ALICE_PASSWORD)
    await lifecycle.create_principal(pool, actor, hash_secret, "svc", service=True, groups=["ops"])
    token = await lifecycle.create_credential(pool, actor, hash_secret, settings.policy, owner="svc", kind="token")
    return Scene(pool, actor, hash_secret, settings, token)


def verifies(settings: Settings, stored_hash: str, secret: str) -> bool:
    return hashing.verify_hash(hashing.hasher_from(settings.argon2), stored_hash, secret)


# --- creating -----------------------------------------------------------------------------------------------


async def test_create_principal_shows_no_hash_and_a_generated_password_once(scene: Scene) -> None:
    created = await lifecycle.create_principal(
        scene.pool, scene.actor, scene.hash_secret, "root", admin=True, groups=["ops"], generate=True)
    assert created.password is not None and len(created.password) >= 16
    assert set(created.principal) == {"id", "name", "kind", "is_admin", "disabled", "created_at", "groups"}
    principal = created.principal
    assert (principal["name"], principal["kind"], principal["is_admin"], principal["groups"]) == (
        "root", "user", True, ["ops"])
    assert created.password not in repr(created)
    stored = await scene.pool.fetchval("SELECT password_hash FROM principals WHERE name = 'root'")
    assert stored.startswith("$argon2id$") and verifies(scene.settings, stored, created.password)


async def test_create_group(scene: Scene) -> None:
    group = await lifecycle.create_group(scene.pool, scene.actor, "dev", "developers")
    assert {k: v for k, v in group.items() if k != "id"} == {"name": "dev", "description": "developers", "members": []}


@pytest.mark.parametrize("kind", ["token", "key"])
async def test_create_credential_shows_the_secret_once_and_stores_its_hash(scene: Scene, kind: str) -> None:
    issued = await lifecycle.create_credential(
        scene.pool, scene.actor, scene.hash_secret, scene.settings.policy, owner="svc", kind=kind, name="nightly")
    credential = issued.credential
    assert (credential["kind"], credential["owner"], credential["name"]) == (kind, "svc", "nightly")
    assert credential["status"] == "valid" and credential["created_by"] == scene.actor.label
    if kind == "token":
        assert issued.token is not None and issued.client_id is None and issued.secret is None
        parsed = formats.parse_token(issued.token)
        assert parsed is not None and parsed.public_id == credential["id"]
        secret = issued.token
    else:
        assert issued.token is None and issued.client_id is not None and issued.secret is not None
        assert formats.parse_key_pair(issued.client_id, issued.secret) is not None
        assert formats.parse_client_id(issued.client_id) == credential["id"] == formats.parse_client_id(
            credential["client_id"])
        secret = issued.secret
    assert secret not in repr(issued) and secret not in str(credential)
    stored = await scene.secret_hashes(credential["id"])
    assert stored["secret_hash"].startswith("$argon2id$") and verifies(scene.settings, stored["secret_hash"], secret)


# --- rotation and revocation --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["token", "key"])
@pytest.mark.parametrize("grace_seconds", [0, 60])
async def test_rotate_keeps_the_id_and_changes_the_secret_hash(scene: Scene, kind: str, grace_seconds: int) -> None:
    issued = await lifecycle.create_credential(
        scene.pool, scene.actor, scene.hash_secret, scene.settings.policy, owner="svc", kind=kind)
    public_id = issued.credential["id"]
    before = await scene.secret_hashes(public_id)

    rotated = await lifecycle.rotate_credential(
        scene.pool, scene.actor, scene.hash_secret, public_id, grace_seconds=grace_seconds)

    assert rotated.credential["id"] == public_id and rotated.client_id == issued.client_id
    assert (rotated.token, rotated.secret) != (issued.token, issued.secret)
    new_secret = rotated.token or rotated.secret
    assert new_secret is not None
    after = await scene.secret_hashes(public_id)
    assert after["secret_hash"] != before["secret_hash"] and verifies(scene.settings, after["secret_hash"], new_secret)
    assert rotated.credential["rotated_at"] is not None
    if grace_seconds:
        assert after["previous_secret_hash"] == before["secret_hash"]
        assert rotated.credential["previous_secret_expires_at"] is not None
    else:
        assert after["previous_secret_hash"] is None
        assert rotated.credential["previous_secret_expires_at"] is None


async def test_revoke_is_irreversible(scene: Scene) -> None:
    revoked = await lifecycle.revoke_credential(scene.pool, scene.actor, scene.token_id)
    assert revoked["status"] == "revoked" and revoked["revoked_at"] is not None
    after_revoke = await scene.last_audit_id()

    again = await lifecycle.revoke_credential(scene.pool, scene.actor, scene.token_id)
    assert again == revoked  # a no-op: same revocation time, no second event
    assert await scene.audit_since(after_revoke) == []
    with pytest.raises(lifecycle.Conflict) as rotating:
        await lifecycle.rotate_credential(scene.pool, scene.actor, scene.hash_secret, scene.token_id)
    with pytest.raises(lifecycle.Conflict) as updating:
        await lifecycle.update_credential(
            scene.pool, scene.actor, scene.settings.policy, scene.token_id, expires_in_days=30, change_expiry=True)
    assert (rotating.value.code, rotating.value.status) == (updating.value.code, updating.value.status) == (
        "conflict", 409)
    assert await scene.audit_since(after_revoke) == []
    async with scene.pool.acquire() as conn:
        assert lifecycle.public_credential(await lifecycle.get_credential(conn, scene.token_id)) == revoked


# --- the audit trail ----------------------------------------------------------------------------------------

Act = Callable[[Scene], Awaitable[str]]  # makes one change, returns the audit target


async def _create_principal(s: Scene) -> str:
    await lifecycle.create_principal(s.pool, s.actor, s.hash_secret, "carol", groups=["ops"])
    return "carol"


async def _disable(s: Scene) -> str:
    await lifecycle.set_disabled(s.pool, s.actor, "alice", disabled=True)
    return "alice"


async def _enable(s: Scene) -> str:
    await lifecycle.set_disabled(s.pool, s.actor, "alice", disabled=False)
    return "alice"


async def _reset_password(s: Scene) -> str:
    await lifecycle.reset_password(s.pool, s.actor, s.hash_secret, "alice")
    return "alice"


async def _delete_principal(s: Scene) -> str:
    assert await lifecycle.delete_principal(s.pool, s.actor, "svc") == [s.token_id]
    return "svc"


async def _create_group(s: Scene) -> str:
    await lifecycle.create_group(s.pool, s.actor, "dev")
    return "dev"


async def _delete_group(s: Scene) -> str:
    await lifecycle.delete_group(s.pool, s.actor, "ops")
    return "ops"


async def _add_member(s: Scene) -> str:
    assert await lifecycle.change_membership(s.pool, s.actor, "ops", "alice", add=True)
    return "ops"


async def _remove_member(s: Scene) -> str:
    assert await lifecycle.change_membership(s.pool, s.actor, "ops", "svc", add=False)
    return "ops"


async def _create_credential(s: Scene) -> str:
    issued = await lifecycle.create_credential(s.pool, s.actor, s.hash_secret, s.settings.policy, owner="alice",
                                               kind="key")
    public_id: str = issued.credential["id"]
    return public_id


async def _rotate(s: Scene) -> str:
    await lifecycle.rotate_credential(s.pool, s.actor, s.hash_secret, s.token_id, grace_seconds=30)
    return s.token_id


async def _revoke(s: Scene) -> str:
    await lifecycle.revoke_credential(s.pool, s.actor, s.token_id)
    return s.token_id


async def _update(s: Scene) -> str:
    await lifecycle.update_credential(s.pool, s.actor, s.settings.policy, s.token_id, name="renamed", owner="alice")
    return s.token_id


# The transaction that last wrote the changed row, given the audit target; None when the change deletes it.
PRINCIPAL_TX = "SELECT xmin::text FROM principals WHERE name = $1"
CREDENTIAL_TX = "SELECT xmin::text FROM credentials WHERE public_id = $1"
ALICE_IN_GROUP_TX = """
SELECT m.xmin::text FROM memberships m JOIN permission_groups g ON g.id = m.group_id
JOIN principals p ON p.id = m.principal_id WHERE g.name = $1 AND p.name = 'alice'"""

AUDITED = [
    pytest.param(_create_principal, "principal.create", "principal", PRINCIPAL_TX, id="create-principal"),
    pytest.param(_disable, "principal.disable", "principal", PRINCIPAL_TX, id="disable"),
    pytest.param(_enable, "principal.enable", "principal", PRINCIPAL_TX, id="enable"),
    pytest.param(_reset_password, "principal.password", "principal", PRINCIPAL_TX, id="reset-password"),
    # A deleted principal keeps its row, renamed, so that its name can be reused.
    pytest.param(_delete_principal, "principal.delete", "principal",
                 "SELECT xmin::text FROM principals WHERE name = $1::text || '~deleted~' || id", id="delete-principal"),
    pytest.param(_create_group, "group.create", "group", "SELECT xmin::text FROM permission_groups WHERE name = $1",
                 id="create-group"),
    pytest.param(_delete_group, "group.delete", "group", None, id="delete-group"),
    pytest.param(_add_member, "group.add_member", "group", ALICE_IN_GROUP_TX, id="add-member"),
    pytest.param(_remove_member, "group.remove_member", "group", None, id="remove-member"),
    pytest.param(_create_credential, "credential.create", "credential", CREDENTIAL_TX, id="create-credential"),
    pytest.param(_rotate, "credential.rotate", "credential", CREDENTIAL_TX, id="rotate"),
    pytest.param(_revoke, "credential.revoke", "credential", CREDENTIAL_TX, id="revoke"),
    pytest.param(_update, "credential.update", "credential", CREDENTIAL_TX, id="update"),
]


@pytest.mark.parametrize(("act", "action", "target_type", "changed_row_tx"), AUDITED)
async def test_each_change_writes_one_audit_event_in_its_own_transaction(
    scene: Scene, act: Act, action: str, target_type: str, changed_row_tx: str | None
) -> None:
    before = await scene.last_audit_id()
    target = await act(scene)
    events = await scene.audit_since(before)
    assert [(e["action"], e["target_type"], e["target"], e["actor"]) for e in events] == [
        (action, target_type, target, scene.actor.label)
    ]
    if changed_row_tx is not None:
        assert await scene.pool.fetchval(changed_row_tx, target) == events[0]["tx"]


async def test_audit_changes_say_what_changed_and_never_a_secret(scene: Scene) -> None:
    before = await scene.last_audit_id()
    await _update(scene)
    await _revoke(scene)
    update, revoke = await scene.audit_since(before)
    assert update["changes"] == {
        "name": {"before": "", "after": "renamed"},
        "owner": {"before": "svc", "after": "alice"},
    }
    assert revoke["changes"] == {"status": {"before": "valid", "after": "revoked"}}
    every_change = str([e["changes"] for e in await scene.audit_since(0)])
    assert scene.token.token is not None and scene.token.token not in every_change
    assert ALICE_PASSWORD not in every_change and "$argon2" not in every_change


async def test_a_refused_change_is_rolled_back_whole(scene: Scene) -> None:
    before = await scene.last_audit_id()
    with pytest.raises(lifecycle.NotFound):
        # The principal is inserted before the unknown group is found.
        await lifecycle.create_principal(scene.pool, scene.actor, scene.hash_secret, "carol", groups=["ops", "nope"])
    assert await scene.pool.fetchval("SELECT count(*) FROM principals WHERE name = 'carol'") == 0
    assert await scene.pool.fetchval("SELECT count(*) FROM memberships") == 1  # svc in ops, from the scene
    assert await scene.audit_since(before) == []


# --- the expiry policy --------------------------------------------------------------------------------------

DEFAULT_POLICY = PolicySettings()  # 90 days by default, 365 at most, never-expiring refused
SHORT_POLICY = PolicySettings(default_expiry_days=7, max_expiry_days=30)
NEVER_ALLOWED = PolicySettings(allow_never_expires=True)
IN_30_DAYS = datetime.now(UTC) + timedelta(days=30)
# A lifetime in days, that exact time, never (None), or the refusal: (error, code, field).
Expiry = int | datetime | None | tuple[type[lifecycle.LifecycleError], str, str]


@pytest.mark.parametrize(
    ("policy", "asked", "expected"),
    [
        pytest.param(DEFAULT_POLICY, {}, 90, id="default"),
        pytest.param(SHORT_POLICY, {}, 7, id="policy-default"),
        pytest.param(DEFAULT_POLICY, {"expires_in_days": 1}, 1, id="one-day"),
        pytest.param(DEFAULT_POLICY, {"expires_in_days": 365}, 365, id="maximum"),
        pytest.param(DEFAULT_POLICY, {"expires_at": IN_30_DAYS}, IN_30_DAYS, id="expires-at"),
        pytest.param(NEVER_ALLOWED, {"expires_in_days": "never"}, None, id="never-allowed"),
        pytest.param(DEFAULT_POLICY, {"expires_in_days": 366},
                     (lifecycle.PolicyViolation, "policy_violation", "expires_in_days"), id="over-maximum"),
        pytest.param(SHORT_POLICY, {"expires_in_days": 31},
                     (lifecycle.PolicyViolation, "policy_violation", "expires_in_days"), id="over-policy-maximum"),
        pytest.param(DEFAULT_POLICY, {"expires_at": datetime.now(UTC) + timedelta(days=400)},
                     (lifecycle.PolicyViolation, "policy_violation", "expires_at"), id="expires-at-over-maximum"),
        pytest.param(DEFAULT_POLICY, {"expires_in_days": "never"},
                     (lifecycle.PolicyViolation, "policy_violation", "expires_in_days"), id="never-refused"),
        pytest.param(DEFAULT_POLICY, {"expires_in_days": 0},
                     (lifecycle.LifecycleError, "invalid_request", "expires_in_days"), id="zero-days"),
        pytest.param(DEFAULT_POLICY, {"expires_in_days": True},
                     (lifecycle.LifecycleError, "invalid_request", "expires_in_days"), id="boolean-days"),
        pytest.param(DEFAULT_POLICY, {"expires_at": datetime.now(UTC) - timedelta(minutes=1)},
                     (lifecycle.LifecycleError, "invalid_request", "expires_at"), id="in-the-past"),
        pytest.param(DEFAULT_POLICY, {"expires_at": IN_30_DAYS.replace(tzinfo=None)},
                     (lifecycle.LifecycleError, "invalid_request", "expires_at"), id="no-time-zone"),
        pytest.param(DEFAULT_POLICY, {"expires_in_days": 30, "expires_at": IN_30_DAYS},
                     (lifecycle.LifecycleError, "invalid_request", "expires_at"), id="both"),
    ],
)
async def test_expiry_policy(scene: Scene, policy: PolicySettings, asked: dict[str, Any], expected: Expiry) -> None:
    create = lifecycle.create_credential(scene.pool, scene.actor, scene.hash_secret, policy, owner="alice",
                                         kind="token", **asked)
    if isinstance(expected, tuple):
        error, code, field = expected
        with pytest.raises(lifecycle.LifecycleError) as refused:
            await create
        assert (type(refused.value), refused.value.code, refused.value.status, refused.value.field) == (
            error, code, 400, field)
        assert await scene.pool.fetchval("SELECT count(*) FROM credentials c JOIN principals p ON p.id = c.owner_id "
                                         "WHERE p.name = 'alice'") == 0
        return
    credential = (await create).credential
    if expected is None:
        assert credential["expires_at"] is None and credential["status"] == "valid"
    elif isinstance(expected, datetime):
        assert credential["expires_at"] == expected
    else:
        lifetime = credential["expires_at"] - credential["created_at"]
        assert abs(lifetime - timedelta(days=expected)) < timedelta(minutes=1)


async def test_an_edited_expiry_obeys_the_policy_too(scene: Scene) -> None:
    with pytest.raises(lifecycle.PolicyViolation):
        await lifecycle.update_credential(
            scene.pool, scene.actor, SHORT_POLICY, scene.token_id, expires_in_days=31, change_expiry=True)
    edited = await lifecycle.update_credential(
        scene.pool, scene.actor, NEVER_ALLOWED, scene.token_id, expires_in_days="never", change_expiry=True)
    assert edited["expires_at"] is None


# --- refusals -----------------------------------------------------------------------------------------------

Refused = Callable[[Scene], Awaitable[object]]


def _refused(
    call: Refused, error: type[lifecycle.LifecycleError], code: str, status: int, field: str, id: str
) -> Any:
    return pytest.param(call, error, code, status, field, id=id)


NOT_FOUND = (lifecycle.NotFound, "not_found", 404)
CONFLICT = (lifecycle.Conflict, "conflict", 409)
INVALID = (lifecycle.LifecycleError, "invalid_request", 400)

REFUSALS = [
    _refused(lambda s: lifecycle.create_principal(s.pool, s.actor, s.hash_secret, "alice"), *CONFLICT, "name",
             id="principal-name-taken"),
    _refused(lambda s: lifecycle.create_principal(s.pool, s.actor, s.hash_secret, "-carol"), *INVALID, "name",
             id="principal-name-invalid"),
    _refused(lambda s: lifecycle.create_principal(s.pool, s.actor, s.hash_secret, "carol", password="short"),
             *INVALID, "password", id="password-too-short"),
    _refused(lambda s: lifecycle.create_principal(s.pool, s.actor, s.hash_secret, "bot", service=True,
                                                  password=ALICE_PASSWORD), *INVALID, "password",
             id="service-with-password"),
    _refused(lambda s: lifecycle.create_principal(s.pool, s.actor, s.hash_secret, "carol", groups=["nope"]),
             *NOT_FOUND, "groups", id="principal-in-unknown-group"),
    _refused(lambda s: lifecycle.set_disabled(s.pool, s.actor, "nobody", disabled=True), *NOT_FOUND, "name",
             id="disable-unknown"),
    _refused(lambda s: lifecycle.delete_principal(s.pool, s.actor, "nobody"), *NOT_FOUND, "name",
             id="delete-unknown-principal"),
    _refused(lambda s: lifecycle.reset_password(s.pool, s.actor, s.hash_secret, "svc"), *INVALID, "name",
             id="service-password"),
    _refused(lambda s: lifecycle.reset_password(s.pool, s.actor, s.hash_secret, "alice", "short"), *INVALID,
             "password", id="reset-password-too-short"),
    _refused(lambda s: lifecycle.create_group(s.pool, s.actor, "ops"), *CONFLICT, "name", id="group-name-taken"),
    _refused(lambda s: lifecycle.create_group(s.pool, s.actor, "no spaces"), *INVALID, "name",
             id="group-name-invalid"),
    _refused(lambda s: lifecycle.delete_group(s.pool, s.actor, "nope"), *NOT_FOUND, "name", id="delete-unknown-group"),
    _refused(lambda s: lifecycle.change_membership(s.pool, s.actor, "nope", "alice", add=True), *NOT_FOUND, "group",
             id="member-of-unknown-group"),
    _refused(lambda s: lifecycle.change_membership(s.pool, s.actor, "ops", "nobody", add=True), *NOT_FOUND, "name",
             id="unknown-member"),
    _refused(lambda s: lifecycle.create_credential(s.pool, s.actor, s.hash_secret, s.settings.policy,
                                                   owner="nobody", kind="token"), *NOT_FOUND, "name",
             id="credential-for-unknown-owner"),
    _refused(lambda s: lifecycle.create_credential(s.pool, s.actor, s.hash_secret, s.settings.policy,
                                                   owner="svc", kind="password"), *INVALID, "kind",
             id="unknown-kind"),
    _refused(lambda s: lifecycle.create_credential(s.pool, s.actor, s.hash_secret, s.settings.policy,
                                                   owner="svc", kind="token", name="x" * 201), *INVALID, "name",
             id="credential-name-too-long"),
    _refused(lambda s: lifecycle.update_credential(s.pool, s.actor, s.settings.policy, s.token_id, name="x" * 201),
             *INVALID, "name", id="renamed-too-long"),
    _refused(lambda s: lifecycle.update_credential(s.pool, s.actor, s.settings.policy, s.token_id, owner="nobody"),
             *NOT_FOUND, "name", id="moved-to-unknown-owner"),
    _refused(lambda s: lifecycle.rotate_credential(s.pool, s.actor, s.hash_secret, UNKNOWN_ID), *NOT_FOUND, "id",
             id="rotate-unknown"),
    _refused(lambda s: lifecycle.rotate_credential(s.pool, s.actor, s.hash_secret, "not an id"), *NOT_FOUND, "id",
             id="rotate-malformed-id"),
    _refused(lambda s: lifecycle.rotate_credential(s.pool, s.actor, s.hash_secret, s.token_id, grace_seconds=-1),
             *INVALID, "grace_seconds", id="negative-grace"),
    _refused(lambda s: lifecycle.rotate_credential(s.pool, s.actor, s.hash_secret, s.token_id,
                                                   grace_seconds=7 * 86400 + 1), *INVALID, "grace_seconds",
             id="grace-over-a-week"),
    _refused(lambda s: lifecycle.rotate_credential(s.pool, s.actor, s.hash_secret, s.token_id, grace_seconds=True),
             *INVALID, "grace_seconds", id="boolean-grace"),
    _refused(lambda s: lifecycle.revoke_credential(s.pool, s.actor, UNKNOWN_ID), *NOT_FOUND, "id",
             id="revoke-unknown"),
]


@pytest.mark.parametrize(("call", "error", "code", "status", "field"), REFUSALS)
async def test_refusals_raise_the_lifecycle_error_and_change_nothing(
    scene: Scene, call: Refused, error: type[lifecycle.LifecycleError], code: str, status: int, field: str
) -> None:
    before = await scene.last_audit_id()
    with pytest.raises(lifecycle.LifecycleError) as refused:
        await call(scene)
    assert (type(refused.value), refused.value.code, refused.value.status, refused.value.field) == (
        error, code, status, field)
    assert refused.value.message == str(refused.value)
    assert await scene.audit_since(before) == []
