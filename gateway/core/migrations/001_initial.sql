-- credgate schema: principals, groups, credentials, audit trail, usage counters, change notifications.

CREATE TABLE principals (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$'),
    kind          text NOT NULL CHECK (kind IN ('user', 'service')),
    is_admin      boolean NOT NULL DEFAULT false,
    disabled      boolean NOT NULL DEFAULT false,
    deleted_at    timestamptz,
    -- argon2id hash of an interactive user's password; service accounts never have one
    password_hash text CHECK (password_hash IS NULL OR kind = 'user'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE permission_groups (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$'),
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    principal_id bigint NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    group_id     bigint NOT NULL REFERENCES permission_groups (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal_id, group_id)
);
CREATE INDEX memberships_group_idx ON memberships (group_id);

CREATE TABLE credentials (
    id                   bigserial PRIMARY KEY,
    public_id            text NOT NULL UNIQUE CHECK (public_id ~ '^[0-9A-Za-z]{12}$'),
    kind                 text NOT NULL CHECK (kind IN ('token', 'key')),
    secret_hash          text NOT NULL CHECK (secret_hash LIKE '$argon2id$%'),
    name                 text NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    owner_id             bigint NOT NULL REFERENCES principals (id),
    -- the principal who created it; NULL when created from the CLI (created_by says who)
    creator_id           bigint REFERENCES principals (id),
    created_by           text NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    expires_at           timestamptz,
    revoked_at           timestamptz,
    last_used_at         timestamptz,
    rotated_at           timestamptz,
    -- after a rotation with a grace period the old secret keeps working until previous_expires_at
    previous_secret_hash text CHECK (previous_secret_hash IS NULL OR previous_secret_hash LIKE '$argon2id$%'),
    previous_expires_at  timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credentials_owner_idx ON credentials (owner_id);
CREATE INDEX credentials_expires_idx ON credentials (expires_at) WHERE revoked_at IS NULL;

CREATE TABLE audit_events (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor        text NOT NULL,
    actor_id     bigint,
    auth_method  text NOT NULL DEFAULT '',
    action       text NOT NULL,
    target_type  text NOT NULL,
    target       text NOT NULL,
    changes      jsonb NOT NULL DEFAULT '{}'::jsonb,
    request_id   text NOT NULL DEFAULT '',
    source       text NOT NULL DEFAULT ''
);
CREATE INDEX audit_events_at_idx ON audit_events (at);
CREATE INDEX audit_events_target_idx ON audit_events (target_type, target);
CREATE INDEX audit_events_actor_idx ON audit_events (actor);

-- The audit trail is append-only: the database itself refuses UPDATE, DELETE and TRUNCATE.
CREATE FUNCTION credgate_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION credgate_audit_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION credgate_audit_append_only();

CREATE TABLE credential_usage (
    credential_id bigint NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
    day           date NOT NULL,
    requests      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (credential_id, day)
);

-- Change notifications: anything that changes how a credential authenticates sends a NOTIFY on
-- channel credgate_auth, so every gateway evicts its caches, even for changes made with psql.
-- Payload: {"t": "c"|"p"|"all", "id": <public_id or principal id>, "ts": <epoch seconds at change>}
CREATE FUNCTION credgate_notify(kind text, ident text) RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('credgate_auth', json_build_object(
        't', kind, 'id', ident, 'ts', extract(epoch FROM clock_timestamp()))::text);
$$;

CREATE FUNCTION credgate_credentials_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM credgate_notify('c', OLD.public_id);
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.public_id IS DISTINCT FROM OLD.public_id THEN
        PERFORM credgate_notify('c', OLD.public_id);
    END IF;
    -- an INSERT also notifies: gateways drop a negative-cache entry for that id
    IF TG_OP = 'INSERT' OR ROW(NEW.secret_hash, NEW.owner_id, NEW.expires_at, NEW.revoked_at, NEW.name,
            NEW.previous_secret_hash, NEW.previous_expires_at, NEW.kind, NEW.public_id)
        IS DISTINCT FROM ROW(OLD.secret_hash, OLD.owner_id, OLD.expires_at, OLD.revoked_at, OLD.name,
            OLD.previous_secret_hash, OLD.previous_expires_at, OLD.kind, OLD.public_id) THEN
        PERFORM credgate_notify('c', NEW.public_id);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER credentials_notify AFTER INSERT OR UPDATE OR DELETE ON credentials
    FOR EACH ROW EXECUTE FUNCTION credgate_credentials_changed();

CREATE FUNCTION credgate_principals_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM credgate_notify('p', OLD.id::text);
        RETURN OLD;
    END IF;
    IF ROW(NEW.name, NEW.disabled, NEW.deleted_at, NEW.kind) IS DISTINCT FROM
       ROW(OLD.name, OLD.disabled, OLD.deleted_at, OLD.kind) THEN
        PERFORM credgate_notify('p', NEW.id::text);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER principals_notify AFTER UPDATE OR DELETE ON principals
    FOR EACH ROW EXECUTE FUNCTION credgate_principals_changed();

CREATE FUNCTION credgate_memberships_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        PERFORM credgate_notify('p', OLD.principal_id::text);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM credgate_notify('p', NEW.principal_id::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER memberships_notify AFTER INSERT OR UPDATE OR DELETE ON memberships
    FOR EACH ROW EXECUTE FUNCTION credgate_memberships_changed();

-- A renamed group changes the X-Auth-Groups of every member: flush everything (rare).
CREATE FUNCTION credgate_groups_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM credgate_notify('all', '');
    RETURN NULL;
END $$;
CREATE TRIGGER permission_groups_notify AFTER UPDATE OF name ON permission_groups
    FOR EACH ROW EXECUTE FUNCTION credgate_groups_changed();
