"""The Postgres store: migrations and every SQL statement credgate runs, as constants, with thin asyncpg calls."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from importlib import resources
from typing import Any

import asyncpg

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "credgate_auth"
# Arbitrary constant shared by every credgate process: serialises concurrent `credgate migrate` runs.
MIGRATION_LOCK_ID = 0x63726564_67617465 & 0x7FFFFFFFFFFFFFFF

Connection = Any  # asyncpg.Connection | asyncpg.pool.PoolConnectionProxy (asyncpg ships no type hints)
Pool = Any


def _json_encode(value: Any) -> str:
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> Pool:
    """An asyncpg pool; statement cache on, JSON codec for jsonb columns."""

    async def init(conn: Connection) -> None:
        await conn.set_type_codec("jsonb", encoder=_json_encode, decoder=json.loads, schema="pg_catalog")

    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init,
        command_timeout=30,
        server_settings={"application_name": "credgate"},
    )


# --- migrations -------------------------------------------------------------------------------------------

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) for every shipped migration, in order."""
    folder = resources.files("gateway.core").joinpath("migrations")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), folder.joinpath(name).read_text(encoding="utf-8")) for name in names]


async def migrate(conn: Connection) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns the versions applied.

    A session-level advisory lock makes concurrent runs wait for each other, so two processes migrating
    at once end with one schema; a second run applies nothing.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(CREATE_MIGRATIONS_TABLE)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied: list[str] = []
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            logger.info("applied migration %s", version)
            applied.append(version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


# --- authentication lookup (gateway hot path on a cache miss) ----------------------------------------------

AUTH_LOOKUP = """
SELECT c.id, c.public_id, c.kind, c.secret_hash, c.previous_secret_hash, c.previous_expires_at,
       c.name, c.expires_at, c.revoked_at, c.created_by, c.creator_id,
       o.id AS owner_id, o.name AS owner_name, (o.disabled OR o.deleted_at IS NOT NULL) AS owner_disabled,
       cr.name AS creator_name,
       ARRAY(SELECT g.name FROM memberships m JOIN permission_groups g ON g.id = m.group_id
             WHERE m.principal_id = o.id ORDER BY g.name) AS groups
FROM credentials c
JOIN principals o ON o.id = c.owner_id
LEFT JOIN principals cr ON cr.id = c.creator_id
WHERE c.public_id = $1"""


@dataclass(frozen=True, slots=True)
class AuthRecord:
    """Everything the gateway needs to decide on one credential, read in one query."""

    id: int
    public_id: str
    kind: str
    secret_hash: str
    previous_secret_hash: str | None
    previous_expires_at: datetime | None
    name: str
    expires_at: datetime | None
    revoked_at: datetime | None
    owner_id: int
    owner_name: str
    owner_disabled: bool
    creator: str
    groups: tuple[str, ...]

    def __repr__(self) -> str:  # hashes are not secrets, but nothing that verifies a secret goes into logs
        return f"AuthRecord(public_id={self.public_id!r}, kind={self.kind!r}, owner={self.owner_name!r})"


async def fetch_auth_record(conn: Connection, public_id: str) -> AuthRecord | None:
    row = await conn.fetchrow(AUTH_LOOKUP, public_id)
    return None if row is None else record_from_row(row)


def record_from_row(row: Any) -> AuthRecord:
    return AuthRecord(
        id=row["id"],
        public_id=row["public_id"],
        kind=row["kind"],
        secret_hash=row["secret_hash"],
        previous_secret_hash=row["previous_secret_hash"],
        previous_expires_at=row["previous_expires_at"],
        name=row["name"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        owner_id=row["owner_id"],
        owner_name=row["owner_name"],
        owner_disabled=row["owner_disabled"],
        creator=row["creator_name"] or row["created_by"],
        groups=tuple(row["groups"]),
    )


UPDATE_SECRET_HASH = "UPDATE credentials SET secret_hash = $2 WHERE public_id = $1 AND secret_hash = $3"


# --- principals ---------------------------------------------------------------------------------------------

PRINCIPAL_COLUMNS = "id, name, kind, is_admin, disabled, deleted_at, created_at, updated_at, password_hash"

INSERT_PRINCIPAL = f"""
INSERT INTO principals (name, kind, is_admin, password_hash) VALUES ($1, $2, $3, $4)
RETURNING {PRINCIPAL_COLUMNS}"""
PRINCIPAL_BY_NAME = f"SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE name = $1 AND deleted_at IS NULL"
PRINCIPAL_BY_ID = f"SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE id = $1"
LIST_PRINCIPALS = f"""
SELECT {PRINCIPAL_COLUMNS},
       ARRAY(SELECT g.name FROM memberships m JOIN permission_groups g ON g.id = m.group_id
             WHERE m.principal_id = p.id ORDER BY g.name) AS groups
FROM principals p
WHERE deleted_at IS NULL AND ($1::text IS NULL OR kind = $1) AND id > $2
ORDER BY id LIMIT $3"""
SET_PRINCIPAL_DISABLED = f"""
UPDATE principals SET disabled = $2, updated_at = now() WHERE id = $1 RETURNING {PRINCIPAL_COLUMNS}"""
SET_PRINCIPAL_ADMIN = f"""
UPDATE principals SET is_admin = $2, updated_at = now() WHERE id = $1 RETURNING {PRINCIPAL_COLUMNS}"""
SET_PASSWORD_HASH = "UPDATE principals SET password_hash = $2, updated_at = now() WHERE id = $1"
MARK_PRINCIPAL_DELETED = """
UPDATE principals SET deleted_at = now(), disabled = true, password_hash = NULL, updated_at = now(),
       name = name || '~deleted~' || id WHERE id = $1"""
PRINCIPAL_GROUPS = """
SELECT g.name FROM memberships m JOIN permission_groups g ON g.id = m.group_id
WHERE m.principal_id = $1 ORDER BY g.name"""
COUNT_ADMINS = "SELECT count(*) FROM principals WHERE is_admin AND NOT disabled AND deleted_at IS NULL"

# --- groups -------------------------------------------------------------------------------------------------

INSERT_GROUP = (
    "INSERT INTO permission_groups (name, description) VALUES ($1, $2) RETURNING id, name, description, created_at"
)
GROUP_BY_NAME = "SELECT id, name, description, created_at FROM permission_groups WHERE name = $1"
LIST_GROUPS = """
SELECT g.id, g.name, g.description, g.created_at,
       ARRAY(SELECT p.name FROM memberships m JOIN principals p ON p.id = m.principal_id
             WHERE m.group_id = g.id AND p.deleted_at IS NULL ORDER BY p.name) AS members
FROM permission_groups g ORDER BY g.name"""
DELETE_GROUP = "DELETE FROM permission_groups WHERE id = $1"
ADD_MEMBER = """
INSERT INTO memberships (principal_id, group_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING principal_id"""
REMOVE_MEMBER = "DELETE FROM memberships WHERE principal_id = $1 AND group_id = $2 RETURNING principal_id"
GROUP_MEMBER_IDS = "SELECT principal_id FROM memberships WHERE group_id = $1"

# --- credentials --------------------------------------------------------------------------------------------

CREDENTIAL_COLUMNS = """
c.id, c.public_id, c.kind, c.name, c.owner_id, o.name AS owner_name, o.kind AS owner_kind,
(o.disabled OR o.deleted_at IS NOT NULL) AS owner_disabled, c.creator_id, c.created_by,
c.created_at, c.expires_at, c.revoked_at, c.last_used_at, c.rotated_at, c.previous_expires_at"""

INSERT_CREDENTIAL = """
INSERT INTO credentials (public_id, kind, secret_hash, name, owner_id, creator_id, created_by, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id"""
CREDENTIAL_BY_PUBLIC_ID = f"""
SELECT {CREDENTIAL_COLUMNS} FROM credentials c JOIN principals o ON o.id = c.owner_id WHERE c.public_id = $1"""
# Filters: owner id, status, kind, expiring before; keyset pagination on id.
LIST_CREDENTIALS = f"""
SELECT {CREDENTIAL_COLUMNS} FROM credentials c JOIN principals o ON o.id = c.owner_id
WHERE ($1::bigint IS NULL OR c.owner_id = $1)
  AND ($2::text IS NULL OR c.kind = $2)
  AND ($3::timestamptz IS NULL OR (c.expires_at IS NOT NULL AND c.expires_at < $3))
  AND ($4::text IS NULL OR $4 = CASE
        WHEN c.revoked_at IS NOT NULL THEN 'revoked'
        WHEN c.expires_at IS NOT NULL AND c.expires_at <= now() THEN 'expired'
        WHEN o.disabled OR o.deleted_at IS NOT NULL THEN 'suspended'
        ELSE 'valid' END)
  AND c.id > $5
ORDER BY c.id LIMIT $6"""
ROTATE_CREDENTIAL = """
UPDATE credentials SET
    previous_secret_hash = CASE WHEN $3::timestamptz IS NULL THEN NULL ELSE secret_hash END,
    previous_expires_at = $3, secret_hash = $2, rotated_at = now(), updated_at = now()
WHERE public_id = $1 AND revoked_at IS NULL RETURNING id"""
REVOKE_CREDENTIAL = """
UPDATE credentials SET revoked_at = now(), previous_secret_hash = NULL, previous_expires_at = NULL,
       updated_at = now()
WHERE public_id = $1 AND revoked_at IS NULL RETURNING id"""
REVOKE_OWNER_CREDENTIALS = """
UPDATE credentials SET revoked_at = now(), previous_secret_hash = NULL, previous_expires_at = NULL,
       updated_at = now()
WHERE owner_id = $1 AND revoked_at IS NULL RETURNING public_id"""
UPDATE_CREDENTIAL = """
UPDATE credentials SET name = $2, expires_at = $3, owner_id = $4, updated_at = now()
WHERE public_id = $1 AND revoked_at IS NULL RETURNING id"""


def credential_status(row: Mapping[str, Any], now: datetime) -> str:
    """valid / expired / suspended / revoked, derived the same way as LIST_CREDENTIALS' status filter."""
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "expired"
    if row["owner_disabled"]:
        return "suspended"
    return "valid"


# --- audit --------------------------------------------------------------------------------------------------

INSERT_AUDIT = """
INSERT INTO audit_events (actor, actor_id, auth_method, action, target_type, target, changes, request_id, source)
VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9) RETURNING id, at"""
LIST_AUDIT = """
SELECT id, at, actor, actor_id, auth_method, action, target_type, target, changes, request_id, source
FROM audit_events
WHERE ($1::text IS NULL OR actor = $1) AND ($2::text IS NULL OR target = $2)
  AND ($3::text IS NULL OR action = $3) AND ($4::timestamptz IS NULL OR at >= $4)
  AND ($5::timestamptz IS NULL OR at < $5) AND id < $6
ORDER BY id DESC LIMIT $7"""


@dataclass(frozen=True, slots=True)
class Actor:
    """Who performs a change, for the audit trail: `cli:<os user>` or a principal and how it authenticated."""

    label: str
    principal_id: int | None = None
    auth_method: str = ""
    request_id: str = ""
    source: str = ""


async def write_audit(
    conn: Connection, actor: Actor, action: str, target_type: str, target: str, changes: Mapping[str, Any] | None = None
) -> None:
    """Append one audit event; call inside the transaction that makes the change."""
    await conn.execute(
        INSERT_AUDIT,
        actor.label,
        actor.principal_id,
        actor.auth_method,
        action,
        target_type,
        target,
        _json_encode(dict(changes or {})),
        actor.request_id,
        actor.source,
    )


# --- usage --------------------------------------------------------------------------------------------------

UPSERT_USAGE = """
INSERT INTO credential_usage (credential_id, day, requests)
SELECT * FROM unnest($1::bigint[], $2::date[], $3::bigint[])
ON CONFLICT (credential_id, day) DO UPDATE SET requests = credential_usage.requests + EXCLUDED.requests"""
TOUCH_LAST_USED = """
UPDATE credentials c SET last_used_at = GREATEST(c.last_used_at, u.at)
FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, at) WHERE c.id = u.id"""
USAGE_FOR_CREDENTIAL = """
SELECT day, requests FROM credential_usage WHERE credential_id = $1 AND day >= $2 ORDER BY day"""


async def write_usage(
    conn: Connection, counts: Mapping[tuple[int, date], int], last_used: Mapping[int, datetime]
) -> None:
    """Flush batched per-day request counts and last-used times in one transaction."""
    if not counts and not last_used:
        return
    async with conn.transaction():
        if counts:
            keys = sorted(counts)
            await conn.execute(UPSERT_USAGE, [k[0] for k in keys], [k[1] for k in keys], [counts[k] for k in keys])
        if last_used:
            ids = sorted(last_used)
            await conn.execute(TOUCH_LAST_USED, ids, [last_used[i] for i in ids])


def rows_to_dicts(rows: Iterable[Any]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


def first_column(rows: Sequence[Any]) -> list[Any]:
    return [r[0] for r in rows]


# --- admin service (migration 002): sessions, login throttle, rotate idempotency, gauges ------------------

INSERT_ADMIN_SESSION = """
INSERT INTO admin_sessions (id_hash, principal_id, expires_at, source)
VALUES ($1, $2, now() + make_interval(secs => $3), $4) RETURNING expires_at"""
# A session only authenticates while its principal is an enabled, undeleted interactive user.
ADMIN_SESSION_PRINCIPAL = """
SELECT s.expires_at, p.id, p.name, p.kind, p.is_admin
FROM admin_sessions s JOIN principals p ON p.id = s.principal_id
WHERE s.id_hash = $1 AND s.expires_at > now() AND p.kind = 'user' AND NOT p.disabled AND p.deleted_at IS NULL"""
DELETE_ADMIN_SESSION = "DELETE FROM admin_sessions WHERE id_hash = $1 RETURNING principal_id"
# Every session of a principal except (optionally) the one making the request.
DELETE_PRINCIPAL_SESSIONS = """
DELETE FROM admin_sessions WHERE principal_id = $1 AND ($2::bytea IS NULL OR id_hash <> $2)"""
DELETE_EXPIRED_ADMIN_SESSIONS = "DELETE FROM admin_sessions WHERE expires_at <= now()"

RECENT_LOGIN_FAILURES = """
SELECT failed_at, now() AS now FROM admin_login_failures
WHERE scope = $1 AND key = $2 AND failed_at > now() - make_interval(secs => $3)
ORDER BY failed_at DESC LIMIT $4"""
INSERT_LOGIN_FAILURES = "INSERT INTO admin_login_failures (scope, key) VALUES ('user', $1), ('address', $2)"
CLEAR_USER_LOGIN_FAILURES = "DELETE FROM admin_login_failures WHERE scope = 'user' AND key = $1"
PRUNE_LOGIN_FAILURES = "DELETE FROM admin_login_failures WHERE failed_at <= now() - make_interval(secs => $1)"

# Claims a key for a rotation; an existing claim younger than $5 seconds wins (RETURNING gives no row).
CLAIM_IDEMPOTENCY_KEY = """
INSERT INTO admin_idempotency_keys (principal_id, key_hash, credential_public_id, fingerprint)
VALUES ($1, $2, $3, $4)
ON CONFLICT (principal_id, key_hash) DO UPDATE
    SET credential_public_id = EXCLUDED.credential_public_id, fingerprint = EXCLUDED.fingerprint, created_at = now()
    WHERE admin_idempotency_keys.created_at <= now() - make_interval(secs => $5)
RETURNING created_at"""
IDEMPOTENCY_KEY_CLAIM = """
SELECT credential_public_id, fingerprint, created_at FROM admin_idempotency_keys
WHERE principal_id = $1 AND key_hash = $2"""
RELEASE_IDEMPOTENCY_KEY = "DELETE FROM admin_idempotency_keys WHERE principal_id = $1 AND key_hash = $2"
PRUNE_IDEMPOTENCY_KEYS = "DELETE FROM admin_idempotency_keys WHERE created_at <= now() - make_interval(secs => $1)"

LIST_GROUPS_PAGE = """
SELECT g.id, g.name, g.description, g.created_at,
       ARRAY(SELECT p.name FROM memberships m JOIN principals p ON p.id = m.principal_id
             WHERE m.group_id = g.id AND p.deleted_at IS NULL ORDER BY p.name) AS members
FROM permission_groups g WHERE g.name > $1 ORDER BY g.name LIMIT $2"""
GROUP_WITH_MEMBERS = """
SELECT g.id, g.name, g.description, g.created_at,
       ARRAY(SELECT p.name FROM memberships m JOIN principals p ON p.id = m.principal_id
             WHERE m.group_id = g.id AND p.deleted_at IS NULL ORDER BY p.name) AS members
FROM permission_groups g WHERE g.name = $1"""

# One scan for the admin's credential gauges (statuses as in credential_status; expiring = still valid).
CREDENTIAL_GAUGES = """
SELECT
  count(*) FILTER (WHERE c.revoked_at IS NOT NULL) AS revoked,
  count(*) FILTER (WHERE c.revoked_at IS NULL AND c.expires_at <= now()) AS expired,
  count(*) FILTER (WHERE c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > now())
                   AND (o.disabled OR o.deleted_at IS NOT NULL)) AS suspended,
  count(*) FILTER (WHERE c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > now())
                   AND NOT (o.disabled OR o.deleted_at IS NOT NULL)) AS valid,
  count(*) FILTER (WHERE c.revoked_at IS NULL AND NOT (o.disabled OR o.deleted_at IS NOT NULL)
                   AND c.expires_at > now() AND c.expires_at <= now() + interval '7 days') AS expiring_7d,
  count(*) FILTER (WHERE c.revoked_at IS NULL AND NOT (o.disabled OR o.deleted_at IS NOT NULL)
                   AND c.expires_at > now() AND c.expires_at <= now() + interval '30 days') AS expiring_30d
FROM credentials c JOIN principals o ON o.id = c.owner_id"""

# After a successful login with a hash made under older argon2 parameters (only if it did not change since).
REHASH_PASSWORD = "UPDATE principals SET password_hash = $2 WHERE id = $1 AND password_hash = $3"
