"""The admin service's SQL: principals, permission groups, admin sessions, the login throttle and rotate
idempotency keys. Credentials, audit and usage, which the gateway shares, stay in gateway.core.store."""

from __future__ import annotations

from gateway.core.store import group_names_of

# --- principals ---------------------------------------------------------------------------------------------

PRINCIPAL_COLUMNS = "id, name, kind, is_admin, disabled, deleted_at, created_at, updated_at, password_hash"

INSERT_PRINCIPAL = f"""
INSERT INTO principals (name, kind, is_admin, password_hash) VALUES ($1, $2, $3, $4)
RETURNING {PRINCIPAL_COLUMNS}"""
PRINCIPAL_BY_NAME = f"SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE name = $1 AND deleted_at IS NULL"
PRINCIPAL_BY_ID = f"SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE id = $1"
LIST_PRINCIPALS = f"""
SELECT {PRINCIPAL_COLUMNS}, ARRAY({group_names_of("p.id")}) AS groups
FROM principals p
WHERE deleted_at IS NULL AND ($1::text IS NULL OR kind = $1) AND id > $2
ORDER BY id LIMIT $3"""
SET_PRINCIPAL_DISABLED = f"""
UPDATE principals SET disabled = $2, updated_at = now() WHERE id = $1 RETURNING {PRINCIPAL_COLUMNS}"""
SET_PASSWORD_HASH = "UPDATE principals SET password_hash = $2, updated_at = now() WHERE id = $1"
# After a successful login with a hash made under older argon2 parameters (only if it did not change since).
REHASH_PASSWORD = "UPDATE principals SET password_hash = $2 WHERE id = $1 AND password_hash = $3"
MARK_PRINCIPAL_DELETED = """
UPDATE principals SET deleted_at = now(), disabled = true, password_hash = NULL, updated_at = now(),
       name = name || '~deleted~' || id WHERE id = $1"""
PRINCIPAL_GROUPS = group_names_of("$1")

# --- groups -------------------------------------------------------------------------------------------------

INSERT_GROUP = (
    "INSERT INTO permission_groups (name, description) VALUES ($1, $2) RETURNING id, name, description, created_at"
)
GROUP_BY_NAME = "SELECT id, name, description, created_at FROM permission_groups WHERE name = $1"
_GROUPS_WITH_MEMBERS = """
SELECT g.id, g.name, g.description, g.created_at,
       ARRAY(SELECT p.name FROM memberships m JOIN principals p ON p.id = m.principal_id
             WHERE m.group_id = g.id AND p.deleted_at IS NULL ORDER BY p.name) AS members
FROM permission_groups g"""
LIST_GROUPS = f"{_GROUPS_WITH_MEMBERS} ORDER BY g.name"
LIST_GROUPS_PAGE = f"{_GROUPS_WITH_MEMBERS} WHERE g.name > $1 ORDER BY g.name LIMIT $2"
GROUP_WITH_MEMBERS = f"{_GROUPS_WITH_MEMBERS} WHERE g.name = $1"
DELETE_GROUP = "DELETE FROM permission_groups WHERE id = $1"
ADD_MEMBER = """
INSERT INTO memberships (principal_id, group_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING principal_id"""
REMOVE_MEMBER = "DELETE FROM memberships WHERE principal_id = $1 AND group_id = $2 RETURNING principal_id"
GROUP_MEMBER_IDS = "SELECT principal_id FROM memberships WHERE group_id = $1"

# --- admin service (migration 002): sessions, login throttle, rotate idempotency ---------------------------

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
