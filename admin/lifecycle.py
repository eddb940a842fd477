"""Credential, principal and group lifecycle: each change and its audit event in one transaction.

The CLI and the admin API both call these functions, so a rule (expiry policy, rotation, revocation)
exists once. Secrets are generated here and returned exactly once; only argon2id hashes are stored.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg

from admin.credential_limits import KEEP, Change, Limits, resolve_limits
from gateway.core import admin_sql, exposure, formats, hashing, store
from gateway.core.settings import Argon2Settings, PolicySettings
from gateway.core.store import Actor, Connection, Pool, Record

HashSecret = Callable[[str], Awaitable[str]]

MIN_PASSWORD_LENGTH = 12
MAX_CREDENTIAL_NAME_LENGTH = 200


def secret_hasher(settings: Argon2Settings) -> HashSecret:
    """argon2id with the deployment's parameters, in a thread (the CLI and `credgate up` hash a few secrets)."""
    hasher = hashing.hasher_from(settings)

    async def hash_secret(secret: str) -> str:
        return await asyncio.to_thread(hashing.hash_secret, hasher, secret)

    return hash_secret


def cli_actor() -> Actor:
    """The actor recorded for commands run from a shell: `cli:<os user>`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return Actor(label=f"cli:{user}", auth_method="cli", source="cli")


class LifecycleError(Exception):
    """A request the lifecycle refuses; `status` is the HTTP status the admin API answers with."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(LifecycleError):
    status = 404
    code = "not_found"


class Conflict(LifecycleError):
    status = 409
    code = "conflict"


class PolicyViolation(LifecycleError):
    status = 400
    code = "policy_violation"


def now_utc() -> datetime:
    return datetime.now(UTC)


def resolve_expiry(policy: PolicySettings, *, expires_in_days: int | Literal["never"] | None = None,
                   expires_at: datetime | None = None, now: datetime | None = None) -> datetime | None:
    """The expiry time a new or edited credential gets, enforcing the policy's default and maximum."""
    now = now or now_utc()
    if expires_in_days is not None and expires_at is not None:
        raise LifecycleError("give expires_at or expires_in_days, not both", "expires_at")
    if expires_in_days == "never":
        if not policy.allow_never_expires:
            raise PolicyViolation(
                f"credentials that never expire are not allowed by policy; the maximum lifetime is "
                f"{policy.max_expiry_days} days",
                "expires_in_days",
            )
        return None
    if expires_in_days is not None:
        if isinstance(expires_in_days, bool) or not isinstance(expires_in_days, int) or expires_in_days < 1:
            raise LifecycleError('expires_in_days must be a whole number of days >= 1 or "never"', "expires_in_days")
        expires_at = now + timedelta(days=expires_in_days)
    if expires_at is None:
        return now + timedelta(days=policy.default_expiry_days)
    if expires_at.tzinfo is None:
        raise LifecycleError("expires_at must carry a time zone, e.g. 2027-01-01T00:00:00Z", "expires_at")
    if expires_at <= now:
        raise LifecycleError("expires_at must be in the future", "expires_at")
    if expires_at > now + timedelta(days=policy.max_expiry_days, minutes=1):
        raise PolicyViolation(
            f"expiry exceeds the policy maximum of {policy.max_expiry_days} days",
            "expires_at" if expires_in_days is None else "expires_in_days",
        )
    return expires_at


# --- principals -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewPrincipal:
    principal: dict[str, Any]
    password: str | None  # generated for interactive admins and on reset, shown once

    def __repr__(self) -> str:
        return f"NewPrincipal(name={self.principal['name']!r})"


def generate_password() -> str:
    return secrets.token_urlsafe(18)


def _check_password(password: str | None) -> None:
    if password is not None and len(password) < MIN_PASSWORD_LENGTH:
        raise LifecycleError(f"password must be at least {MIN_PASSWORD_LENGTH} characters", "password")


def public_principal(row: Record, groups: Sequence[str] | None = None) -> dict[str, Any]:
    """A principal as shown to clients: never its password hash."""
    data = {k: row[k] for k in ("id", "name", "kind", "is_admin", "disabled", "created_at")}
    data["groups"] = list(groups if groups is not None else row.get("groups") or [])
    return data


async def get_principal(conn: Connection, name: str) -> Record:
    row = await conn.fetchrow(admin_sql.PRINCIPAL_BY_NAME, name)
    if row is None:
        raise NotFound(f"no user or service account named {name!r}", "name")
    return row


async def create_principal(pool: Pool, actor: Actor, hash_secret: HashSecret, name: str, *, service: bool = False,
                           admin: bool = False, groups: Sequence[str] = (), password: str | None = None,
                           generate: bool = False) -> NewPrincipal:
    """Create a user or service account; an interactive user may get a generated password (shown once)."""
    if service and (password or generate):
        raise LifecycleError("service accounts never log in with a password", "password")
    _check_password(password)
    if generate and password is None:
        password = generate_password()
    password_hash = await hash_secret(password) if password else None
    async with pool.acquire() as conn, conn.transaction():
        row = await _insert_principal(conn, actor, name, service, admin, groups, password_hash)
    return NewPrincipal(public_principal(row, sorted(groups)), password)


async def _insert_principal(conn: Connection, actor: Actor, name: str, service: bool, admin: bool,
                            groups: Sequence[str], password_hash: str | None) -> Record:
    try:
        kind = "service" if service else "user"
        row = await conn.fetchrow(admin_sql.INSERT_PRINCIPAL, name, kind, admin, password_hash)
    except asyncpg.UniqueViolationError:
        raise Conflict(f"a principal named {name!r} already exists", "name") from None
    except asyncpg.CheckViolationError:
        raise LifecycleError(
            "name must be 1-128 characters of letters, digits and . _ @ - starting with a letter or digit", "name"
        ) from None
    assert row is not None  # INSERT ... RETURNING gives the new row
    for group in groups:
        g = await conn.fetchrow(admin_sql.GROUP_BY_NAME, group)
        if g is None:
            raise NotFound(f"no group named {group!r}; create it first", "groups")
        await conn.execute(admin_sql.ADD_MEMBER, row["id"], g["id"])
    await store.write_audit(conn, actor, "principal.create", "principal", name, {
        "kind": row["kind"], "is_admin": admin, "groups": list(groups), "password_set": password_hash is not None})
    return row


async def set_disabled(pool: Pool, actor: Actor, name: str, disabled: bool) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        row = await get_principal(conn, name)
        updated = await conn.fetchrow(admin_sql.SET_PRINCIPAL_DISABLED, row["id"], disabled)
        assert updated is not None  # principals are never deleted from the table, only marked deleted
        await store.write_audit(conn, actor, "principal.disable" if disabled else "principal.enable", "principal",
                                name, {"disabled": {"before": row["disabled"], "after": disabled}})
        groups = [r[0] for r in await conn.fetch(admin_sql.PRINCIPAL_GROUPS, row["id"])]
    return public_principal(updated, groups)


async def delete_principal(pool: Pool, actor: Actor, name: str) -> list[str]:
    """Delete a principal: its credentials are revoked (kept for the audit trail), its name is freed."""
    async with pool.acquire() as conn, conn.transaction():
        row = await get_principal(conn, name)
        revoked = [r[0] for r in await conn.fetch(store.REVOKE_OWNER_CREDENTIALS, row["id"])]
        await conn.execute(admin_sql.MARK_PRINCIPAL_DELETED, row["id"])
        await store.write_audit(conn, actor, "principal.delete", "principal", name, {"revoked_credentials": revoked})
    return revoked


async def reset_password(pool: Pool, actor: Actor, hash_secret: HashSecret, name: str,
                         new_password: str | None = None) -> str:
    """Set an interactive user's password (generated when not given); returns it, shown once."""
    _check_password(new_password)
    password = new_password or generate_password()
    password_hash = await hash_secret(password)
    async with pool.acquire() as conn, conn.transaction():
        row = await get_principal(conn, name)
        if row["kind"] != "user":
            raise LifecycleError("service accounts never log in with a password", "name")
        await conn.execute(admin_sql.SET_PASSWORD_HASH, row["id"], password_hash)
        await store.write_audit(conn, actor, "principal.password", "principal", name, {"password_set": True})
    return password


# --- groups -----------------------------------------------------------------------------------------------


async def create_group(pool: Pool, actor: Actor, name: str, description: str = "") -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(admin_sql.INSERT_GROUP, name, description)
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a group named {name!r} already exists", "name") from None
        except asyncpg.CheckViolationError:
            raise LifecycleError("group name must be 1-64 characters of letters, digits and . _ : -", "name") from None
        assert row is not None  # INSERT ... RETURNING gives the new row
        await store.write_audit(conn, actor, "group.create", "group", name, {"description": description})
    return {"id": row["id"], "name": row["name"], "description": row["description"], "members": []}


async def delete_group(pool: Pool, actor: Actor, name: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        group = await conn.fetchrow(admin_sql.GROUP_BY_NAME, name)
        if group is None:
            raise NotFound(f"no group named {name!r}", "name")
        members = await conn.fetch(admin_sql.GROUP_MEMBER_IDS, group["id"])
        await conn.execute(admin_sql.DELETE_GROUP, group["id"])
        await store.write_audit(conn, actor, "group.delete", "group", name, {"members": len(members)})


async def change_membership(pool: Pool, actor: Actor, group_name: str, principal_name: str, add: bool) -> bool:
    """Add or remove a member; returns whether anything changed."""
    async with pool.acquire() as conn, conn.transaction():
        group = await conn.fetchrow(admin_sql.GROUP_BY_NAME, group_name)
        if group is None:
            raise NotFound(f"no group named {group_name!r}", "group")
        principal = await get_principal(conn, principal_name)
        statement = admin_sql.ADD_MEMBER if add else admin_sql.REMOVE_MEMBER
        changed = await conn.fetchval(statement, principal["id"], group["id"])
        if changed is not None:
            await store.write_audit(conn, actor, "group.add_member" if add else "group.remove_member", "group",
                                    group_name, {"member": principal_name})
    return changed is not None


# --- credentials ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuedSecret:
    """A credential's secret in the one response that may show it."""

    credential: dict[str, Any]
    token: str | None = None
    client_id: str | None = None
    secret: str | None = None

    def __repr__(self) -> str:
        return f"IssuedSecret(id={self.credential['id']!r}, kind={self.credential['kind']!r})"

    def reveal(self) -> dict[str, Any]:
        out = dict(self.credential)
        if self.token is not None:
            out["token"] = self.token
        else:
            out["client_id"] = self.client_id
            out["secret"] = self.secret
        return out


def public_credential(row: Record, now: datetime | None = None) -> dict[str, Any]:
    """A credential as shown to clients: never a secret or hash."""
    now = now or now_utc()
    grace_end = row["previous_expires_at"]  # the previous secret works until then (after a rotation)
    data = {
        "id": row["public_id"],
        "kind": row["kind"],
        "name": row["name"],
        "owner": row["owner_name"],
        "created_by": row["created_by"],
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "revoked_at": row["revoked_at"],
        "last_used_at": row["last_used_at"],
        "rotated_at": row["rotated_at"],
        "previous_secret_expires_at": grace_end if grace_end and grace_end > now else None,
        "status": store.credential_status(row, now), **exposure.credential_fields(row, now),  # + status_label
        "rate_limit": row["rate_limit"], "quota": row["quota"], "legacy": bool(row.get("legacy")),  # limits: text|None
    }
    if row["kind"] == "key":
        data["client_id"] = formats.client_id_for(row["public_id"])
    return data


async def get_credential(conn: Connection, public_id: str) -> Record:
    row = await conn.fetchrow(store.CREDENTIAL_BY_PUBLIC_ID, public_id) if formats.is_public_id(public_id) else None
    if row is None:
        raise NotFound(f"no credential {public_id!r}", "id")
    return row


def _check_credential_name(name: str) -> None:
    if len(name) > MAX_CREDENTIAL_NAME_LENGTH:
        raise LifecycleError(f"name must be at most {MAX_CREDENTIAL_NAME_LENGTH} characters", "name")


def _new_secret(kind: str, public_id: str) -> tuple[str, dict[str, str]]:
    if kind == "token":
        token = formats.generate_token(public_id)
        return token, {"token": token}
    secret = formats.generate_key_secret()
    return secret, {"client_id": formats.client_id_for(public_id), "secret": secret}


async def create_credential(pool: Pool, actor: Actor, hash_secret: HashSecret, policy: PolicySettings, *, owner: str,
                            kind: str, name: str = "", expires_in_days: int | Literal["never"] | None = None,
                            expires_at: datetime | None = None, rate_limit: str | None = None,
                            quota: str | None = None) -> IssuedSecret:
    if kind not in ("token", "key"):
        raise LifecycleError('kind must be "token" or "key"', "kind")
    _check_credential_name(name)
    expiry = resolve_expiry(policy, expires_in_days=expires_in_days, expires_at=expires_at)
    limits = resolve_limits(rate_limit, quota, refuse=LifecycleError)
    public_id = formats.new_public_id()
    secret, shown = _new_secret(kind, public_id)
    secret_hash = await hash_secret(secret)
    async with pool.acquire() as conn, conn.transaction():
        row = await _insert_credential(conn, actor, owner, kind, name, expiry, public_id, secret_hash, limits)
    return IssuedSecret(public_credential(row), **shown)


async def _insert_credential(conn: Connection, actor: Actor, owner: str, kind: str, name: str,
                             expiry: datetime | None, public_id: str, secret_hash: str, limits: Limits) -> Record:
    owner_row = await get_principal(conn, owner)
    await conn.execute(store.INSERT_CREDENTIAL, public_id, kind, secret_hash, name, owner_row["id"],
                       actor.principal_id, actor.label, expiry, *limits.values())
    await store.write_audit(conn, actor, "credential.create", "credential", public_id,
                            {"kind": kind, "name": name, "owner": owner, "expires_at": expiry, **limits})
    return await get_credential(conn, public_id)


async def create_api_account(pool: Pool, actor: Actor, hash_secret: HashSecret, policy: PolicySettings, *,
                             name: str, group: str, expires_in_days: int | Literal["never"] | None = None,
                             credential_name: str = "") -> IssuedSecret:
    """An API account for a permission group: a service account in that group and its key pair, in one
    transaction (both exist, with both audit events, or neither does)."""
    _check_credential_name(credential_name)
    expiry = resolve_expiry(policy, expires_in_days=expires_in_days)
    public_id = formats.new_public_id()
    secret, shown = _new_secret("key", public_id)
    secret_hash = await hash_secret(secret)
    async with pool.acquire() as conn, conn.transaction():
        await _insert_principal(conn, actor, name, True, False, [group], None)
        row = await _insert_credential(conn, actor, name, "key", credential_name or name, expiry, public_id,
                                       secret_hash, resolve_limits(None, None))
    return IssuedSecret(public_credential(row), **shown)


async def rotate_credential(pool: Pool, actor: Actor, hash_secret: HashSecret, public_id: str, grace_seconds: int = 0,
                            max_grace_seconds: int = 7 * 86400) -> IssuedSecret:
    """New secret, same id; the old secret stops now or after grace_seconds."""
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, int) or \
            not 0 <= grace_seconds <= max_grace_seconds:
        raise LifecycleError(f"grace_seconds must be an integer from 0 to {max_grace_seconds}", "grace_seconds")
    async with pool.acquire() as conn:
        row = await get_credential(conn, public_id)
    secret, shown = _new_secret(row["kind"], public_id)
    secret_hash = await hash_secret(secret)
    async with pool.acquire() as conn, conn.transaction():
        grace_until = await conn.fetchval(store.NOW_PLUS_SECONDS, grace_seconds) if grace_seconds else None
        if await conn.fetchval(store.ROTATE_CREDENTIAL, public_id, secret_hash, grace_until) is None:
            raise Conflict(f"credential {public_id!r} is revoked and cannot be rotated", "id")
        await store.write_audit(conn, actor, "credential.rotate", "credential", public_id,
                                {"grace_seconds": grace_seconds, "previous_secret_expires_at": grace_until})
        row = await get_credential(conn, public_id)
    return IssuedSecret(public_credential(row), **shown)


async def revoke_credential(pool: Pool, actor: Actor, public_id: str) -> dict[str, Any]:
    """Irreversible. Revoking an already revoked credential is a no-op that changes nothing."""
    async with pool.acquire() as conn, conn.transaction():
        row = await get_credential(conn, public_id)
        if row["revoked_at"] is None:
            await conn.execute(store.REVOKE_CREDENTIAL, public_id)
            await store.write_audit(conn, actor, "credential.revoke", "credential", public_id,
                                    {"status": {"before": store.credential_status(row, now_utc()), "after": "revoked"}})
            row = await get_credential(conn, public_id)
    return public_credential(row)


async def update_credential(pool: Pool, actor: Actor, policy: PolicySettings, public_id: str, *,
                            name: str | None = None, owner: str | None = None,
                            expires_in_days: int | Literal["never"] | None = None, expires_at: datetime | None = None,
                            change_expiry: bool = False, rate_limit: Change = KEEP,
                            quota: Change = KEEP) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        row = await get_credential(conn, public_id)
        if row["revoked_at"] is not None:
            raise Conflict(f"credential {public_id!r} is revoked and cannot be changed", "id")
        new_name = row["name"] if name is None else name
        _check_credential_name(new_name)
        new_expiry = row["expires_at"]
        if change_expiry:
            new_expiry = resolve_expiry(policy, expires_in_days=expires_in_days, expires_at=expires_at)
        owner_id, owner_name = row["owner_id"], row["owner_name"]
        if owner is not None:
            owner_row = await get_principal(conn, owner)
            owner_id, owner_name = owner_row["id"], owner_row["name"]
        limits = resolve_limits(rate_limit, quota, row, refuse=LifecycleError)
        await conn.execute(store.UPDATE_CREDENTIAL, public_id, new_name, new_expiry, owner_id, *limits.values())
        changes = {
            k: {"before": before, "after": after}
            for k, before, after in (
                ("name", row["name"], new_name),
                ("expires_at", row["expires_at"], new_expiry),
                ("owner", row["owner_name"], owner_name),
                *((field, row[field], value) for field, value in limits.items()),
            )
            if before != after
        }
        await store.write_audit(conn, actor, "credential.update", "credential", public_id, changes)
        row = await get_credential(conn, public_id)
    return public_credential(row)


async def list_credentials(conn: Connection, *, owner_id: int | None = None, kind: str | None = None,
                           status: str | None = None, expiring_before: datetime | None = None, after_id: int = 0,
                           limit: int = 100) -> tuple[list[dict[str, Any]], int | None]:
    """One page of credentials and the cursor for the next page (None at the end)."""
    rows = await conn.fetch(store.LIST_CREDENTIALS, owner_id, kind, expiring_before, status, after_id, limit + 1)
    now = now_utc()
    page = rows[:limit]
    next_cursor = page[-1]["id"] if len(rows) > limit else None
    return [public_credential(r, now) for r in page], next_cursor
