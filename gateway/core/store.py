"""The Postgres store: every SQL statement credgate runs, as constants, the typed pool, and thin asyncpg calls."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import date, datetime
from importlib import resources
from typing import Any, Protocol

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "credgate_auth"
# Arbitrary constant shared by every credgate process: serialises concurrent `credgate migrate` runs.
MIGRATION_LOCK_ID = 0x63726564_67617465 & 0x7FFFFFFFFFFFFFFF


# --- the asyncpg calls credgate makes, typed (asyncpg ships no type hints) -----------------------------------


class Record(Protocol):
    """A result row (asyncpg.Record), read by column name or position."""

    def __getitem__(self, key: str | int, /) -> Any: ...

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...  # the values, in column order


class _Queries(Protocol):
    """What a pool and a connection both run; on a pool, each call borrows a connection for itself."""

    async def execute(self, query: str, *args: Any) -> str: ...

    async def fetch(self, query: str, *args: Any) -> list[Record]: ...

    async def fetchrow(self, query: str, *args: Any) -> Record | None: ...

    # asyncpg's own per-statement timeout (the readiness probe bounds its ping with it)
    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any: ...  # noqa: ASYNC109


class Connection(_Queries, Protocol):
    """One connection (asyncpg.Connection, or the proxy a pool hands out)."""

    def transaction(self) -> AbstractAsyncContextManager[None]: ...


class Pool(_Queries, Protocol):
    """An asyncpg pool, as made by gateway.core.database.create_pool."""

    def acquire(self, *, timeout: float | None = None) -> AbstractAsyncContextManager[Connection]: ...

    async def close(self) -> None: ...

    def get_size(self) -> int: ...

    def get_idle_size(self) -> int: ...


def json_encode(value: Any) -> str:
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


# Health and readiness probes: the cheapest statement that still needs a working connection.
PING = "SELECT 1"

# --- migrations -------------------------------------------------------------------------------------------

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
LOCK_MIGRATIONS = "SELECT pg_advisory_lock($1)"
UNLOCK_MIGRATIONS = "SELECT pg_advisory_unlock($1)"
APPLIED_MIGRATIONS = "SELECT version FROM schema_migrations"
RECORD_MIGRATION = "INSERT INTO schema_migrations (version) VALUES ($1)"
# The newest table the admin service needs: absent means `credgate migrate` has not run.
SCHEMA_CHECK = "SELECT to_regclass('admin_idempotency_keys') IS NOT NULL"


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
    await conn.execute(LOCK_MIGRATIONS, MIGRATION_LOCK_ID)
    try:
        await conn.execute(CREATE_MIGRATIONS_TABLE)
        done = {r["version"] for r in await conn.fetch(APPLIED_MIGRATIONS)}
        applied: list[str] = []
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(RECORD_MIGRATION, version)
            logger.info("applied migration %s", version)
            applied.append(version)
        return applied
    finally:
        await conn.execute(UNLOCK_MIGRATIONS, MIGRATION_LOCK_ID)


def group_names_of(principal_id: str) -> str:
    """The names of a principal's groups, sorted; `principal_id` is a parameter or a column of the outer query."""
    return f"""SELECT g.name FROM memberships m JOIN permission_groups g ON g.id = m.group_id
WHERE m.principal_id = {principal_id} ORDER BY g.name"""


# --- authentication lookup (gateway hot path on a cache miss) ----------------------------------------------

AUTH_LOOKUP = f"""
SELECT c.id, c.public_id, c.kind, c.secret_hash, c.previous_secret_hash, c.previous_expires_at,
       c.name, c.expires_at, c.revoked_at, c.created_by, c.creator_id, c.rate_limit, c.quota,
       o.id AS owner_id, o.name AS owner_name, (o.disabled OR o.deleted_at IS NOT NULL) AS owner_disabled,
       cr.name AS creator_name,
       ARRAY({group_names_of("o.id")}) AS groups,
       (SELECT seq FROM credgate_changes) AS change_seq
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
    change_seq: int  # how many changes the snapshot of this read had seen (migration 004)
    rate_limit: str | None = None  # 'N/unit' (migration 005); gateway.core.rate_policy parses them
    quota: str | None = None

    def __repr__(self) -> str:  # hashes are not secrets, but nothing that verifies a secret goes into logs
        return f"AuthRecord(public_id={self.public_id!r}, kind={self.kind!r}, owner={self.owner_name!r})"


async def fetch_auth_record(conn: Connection, public_id: str) -> AuthRecord | None:
    row = await conn.fetchrow(AUTH_LOOKUP, public_id)
    return None if row is None else record_from_row(row)


def record_from_row(row: Record) -> AuthRecord:
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
        change_seq=row["change_seq"],
        rate_limit=row["rate_limit"],
        quota=row["quota"],
    )


# The deployment-wide change sequence (migration 004), read when the LISTEN connection is (re)established.
CHANGE_SEQUENCE = "SELECT seq FROM credgate_changes"
UPDATE_SECRET_HASH = "UPDATE credentials SET secret_hash = $2 WHERE public_id = $1 AND secret_hash = $3"
# The invalidation listener's question when a principal changes: which cached credentials does it own?
CREDENTIAL_IDS_OF_OWNER = "SELECT public_id FROM credentials WHERE owner_id = $1"

# --- credentials --------------------------------------------------------------------------------------------

CREDENTIAL_COLUMNS = """
c.id, c.public_id, c.kind, c.name, c.owner_id, o.name AS owner_name, o.kind AS owner_kind,
(o.disabled OR o.deleted_at IS NOT NULL) AS owner_disabled, c.creator_id, c.created_by,
c.created_at, c.expires_at, c.revoked_at, c.last_used_at, c.rotated_at, c.previous_expires_at, c.rate_limit,
c.quota, c.revoked_reason, c.exposed_url, c.legacy"""

INSERT_CREDENTIAL = """
INSERT INTO credentials (public_id, kind, secret_hash, name, owner_id, creator_id, created_by, expires_at,
                         rate_limit, quota)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id"""
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
# The web UI's credential list: owner ($1), kind ($2), search on the name
# (ILIKE $3) or the public id inside a client ID or token (LIKE $4), the statuses shown ($6, with 'expires-soon'
# for valid credentials expiring within $5 days, as credential_status otherwise), keyset on id both ways:
# $7 = the next page (ids below), $8 = the previous page (ids above, read upwards and shown reversed).
LIST_CREDENTIALS_PAGE = f"""
SELECT {CREDENTIAL_COLUMNS} FROM credentials c JOIN principals o ON o.id = c.owner_id
WHERE ($1::bigint IS NULL OR c.owner_id = $1)
  AND ($2::text IS NULL OR c.kind = $2)
  AND ($3::text IS NULL OR c.name ILIKE $3 OR c.public_id LIKE $4::text)
  AND CASE
        WHEN c.revoked_at IS NOT NULL THEN 'revoked'
        WHEN c.expires_at IS NOT NULL AND c.expires_at <= now() THEN 'expired'
        WHEN o.disabled OR o.deleted_at IS NOT NULL THEN 'suspended'
        WHEN c.expires_at IS NOT NULL AND c.expires_at <= now() + make_interval(days => $5::int) THEN 'expires-soon'
        ELSE 'valid' END = ANY($6::text[])
  AND ($7::bigint IS NULL OR c.id < $7)
  AND ($8::bigint IS NULL OR c.id > $8)
ORDER BY CASE WHEN $8::bigint IS NULL THEN -c.id ELSE c.id END
LIMIT $9"""
# The end of a rotation's grace period, by the database's clock like every other timestamp it compares.
NOW_PLUS_SECONDS = "SELECT now() + make_interval(secs => $1)"
ROTATE_CREDENTIAL = """
UPDATE credentials SET
    previous_secret_hash = CASE WHEN $3::timestamptz IS NULL THEN NULL ELSE secret_hash END,
    previous_expires_at = $3, secret_hash = $2, rotated_at = now(), updated_at = now()
WHERE public_id = $1 AND revoked_at IS NULL RETURNING id"""
# Revoking also ends a rotation's grace period: the previous secret goes with the current one.
_REVOKE = """
UPDATE credentials SET revoked_at = now(), previous_secret_hash = NULL, previous_expires_at = NULL,
       updated_at = now()"""
REVOKE_CREDENTIAL = f"{_REVOKE}\nWHERE public_id = $1 AND revoked_at IS NULL RETURNING id"
REVOKE_OWNER_CREDENTIALS = f"{_REVOKE}\nWHERE owner_id = $1 AND revoked_at IS NULL RETURNING public_id"
UPDATE_CREDENTIAL = """
UPDATE credentials SET name = $2, expires_at = $3, owner_id = $4, rate_limit = $5, quota = $6, updated_at = now()
WHERE public_id = $1 AND revoked_at IS NULL RETURNING id"""


def credential_status(row: Record, now: datetime) -> str:
    """valid / expired / suspended / revoked, derived the same way as LIST_CREDENTIALS' status filter."""
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "expired"
    if row["owner_disabled"]:
        return "suspended"
    return "valid"


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
    await conn.execute(INSERT_AUDIT, actor.label, actor.principal_id, actor.auth_method, action, target_type, target,
                       json_encode(dict(changes or {})), actor.request_id, actor.source)


# --- usage --------------------------------------------------------------------------------------------------

UPSERT_USAGE = """
INSERT INTO credential_usage (credential_id, day, requests)
SELECT * FROM unnest($1::bigint[], $2::date[], $3::bigint[])
ON CONFLICT (credential_id, day) DO UPDATE SET requests = credential_usage.requests + EXCLUDED.requests"""
TOUCH_LAST_USED = """
UPDATE credentials c SET last_used_at = GREATEST(c.last_used_at, u.at)
FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, at) WHERE c.id = u.id"""
# A quota's count after a Redis flush: the forwarded requests usage recorded in the period ($2 and $3 are days).
QUOTA_USED = """
SELECT coalesce(sum(requests), 0) FROM credential_usage WHERE credential_id = $1 AND day >= $2 AND day < $3"""
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


# --- OAuth access-token denylist (migration 003; see gateway.denylist) ------------------------------------

COUNT_LIVE_REVOKED = "SELECT count(*) FROM oauth_revoked_tokens WHERE public_id = $1 AND expires_at > now()"
INSERT_REVOKED_TOKEN = """
INSERT INTO oauth_revoked_tokens (jti, public_id, expires_at) VALUES ($1, $2, to_timestamp($3))
ON CONFLICT (jti) DO NOTHING"""
UPSERT_REVOKED_BEFORE = """
INSERT INTO oauth_revoked_before (public_id, issued_before, expires_at) VALUES ($1, $2, to_timestamp($3))
ON CONFLICT (public_id) DO UPDATE SET
    issued_before = GREATEST(oauth_revoked_before.issued_before, EXCLUDED.issued_before),
    expires_at = GREATEST(oauth_revoked_before.expires_at, EXCLUDED.expires_at), revoked_at = now()"""
PRUNE_REVOKED_TOKENS = "DELETE FROM oauth_revoked_tokens WHERE expires_at <= now()"
PRUNE_REVOKED_BEFORE = "DELETE FROM oauth_revoked_before WHERE expires_at <= now()"
LIVE_REVOKED_TOKENS = """
SELECT jti, extract(epoch FROM expires_at)::float8 AS exp FROM oauth_revoked_tokens WHERE expires_at > now()"""
LIVE_REVOKED_BEFORE = """
SELECT public_id, issued_before, extract(epoch FROM expires_at)::float8 AS exp
FROM oauth_revoked_before WHERE expires_at > now()"""
