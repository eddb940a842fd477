-- Admin service state: login sessions, failed-login counters and rotate idempotency keys.

-- A session is known only by a keyed hash of its cookie value: a copy of this table cannot be replayed.
CREATE TABLE admin_sessions (
    id_hash      bytea PRIMARY KEY,
    principal_id bigint NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    source       text NOT NULL DEFAULT ''
);
CREATE INDEX admin_sessions_principal_idx ON admin_sessions (principal_id);
CREATE INDEX admin_sessions_expires_idx ON admin_sessions (expires_at);

-- Failed password logins, one row per failure and scope, pruned once older than the throttle window.
-- Kept in the database so that every admin process sees the same counts.
CREATE TABLE admin_login_failures (
    id        bigserial PRIMARY KEY,
    scope     text NOT NULL CHECK (scope IN ('user', 'address')),
    key       text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX admin_login_failures_key_idx ON admin_login_failures (scope, key, failed_at);

-- Idempotency-Key of rotate requests: only a hash of the key and of the request, never the response
-- (which holds the new secret). The response itself is replayed from the admin process's memory.
CREATE TABLE admin_idempotency_keys (
    principal_id         bigint NOT NULL,
    key_hash             bytea NOT NULL,
    credential_public_id text NOT NULL,
    fingerprint          bytea NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal_id, key_hash)
);
CREATE INDEX admin_idempotency_keys_created_idx ON admin_idempotency_keys (created_at);

-- Deleting a principal frees its name by renaming it to <name>~deleted~<id> (store.MARK_PRINCIPAL_DELETED),
-- which the original name check refused; allow exactly that form, and only on deleted principals.
ALTER TABLE principals DROP CONSTRAINT principals_name_check;
ALTER TABLE principals ADD CONSTRAINT principals_name_check CHECK (
    name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$'
    OR (deleted_at IS NOT NULL AND name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}~deleted~[0-9]+$'));
