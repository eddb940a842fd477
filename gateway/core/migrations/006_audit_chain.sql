-- Tamper-evident audit: every audit_events row carries sha256(previous row's hash || its canonical content),
-- computed by the database in the inserting transaction, so every writer (API, UI, CLI, gateway, psql) is
-- chained. `credgate audit verify` (gateway.core.audit_chain) walks the chain in chain_seq order.

ALTER TABLE audit_events
    ADD COLUMN chain_seq bigint,  -- 1, 2, 3, ... without gaps, in the order the chain head was locked
    ADD COLUMN prev_hash bytea,   -- the previous row's row_hash (32 zero bytes for the first row)
    ADD COLUMN row_hash  bytea;   -- sha256(prev_hash || convert_to(credgate_audit_canonical(...), 'UTF8'))

-- The one row every audit insert locks: it serialises the chain (FOR UPDATE, held until commit, so
-- concurrent writers queue here and a rolled-back insert leaves no gap) and records the newest link, so
-- rows deleted from the end of the chain are noticed too.
CREATE TABLE audit_chain_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq       bigint NOT NULL,
    hash      bytea NOT NULL
);

-- The canonical content of one row: jsonb's text output is deterministic (keys sorted, one spacing) and
-- `at` is written in UTC with microseconds whatever the session's TimeZone. The verifier calls this same
-- function, so the text exists once.
CREATE FUNCTION credgate_audit_canonical(
    chain_seq bigint, id bigint, at timestamptz, actor text, actor_id bigint, auth_method text, action text,
    target_type text, target text, changes jsonb, request_id text, source text
) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'seq', chain_seq, 'id', id, 'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'actor', actor, 'actor_id', actor_id, 'auth_method', auth_method, 'action', action,
        'target_type', target_type, 'target', target, 'changes', changes,
        'request_id', request_id, 'source', source)::text
$$;

CREATE FUNCTION credgate_audit_link(prev bytea, canonical text) RETURNS bytea
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT sha256(prev || convert_to(canonical, 'UTF8')) $$;

-- SECURITY DEFINER: a role that may only INSERT into audit_events still moves the head it cannot write.
CREATE FUNCTION credgate_audit_chain() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public AS $$
DECLARE
    head audit_chain_head%ROWTYPE;
BEGIN
    SELECT * INTO STRICT head FROM audit_chain_head FOR UPDATE;
    NEW.chain_seq := head.seq + 1;
    NEW.prev_hash := head.hash;
    NEW.row_hash := credgate_audit_link(head.hash, credgate_audit_canonical(
        NEW.chain_seq, NEW.id, NEW.at, NEW.actor, NEW.actor_id, NEW.auth_method, NEW.action,
        NEW.target_type, NEW.target, NEW.changes, NEW.request_id, NEW.source));
    UPDATE audit_chain_head SET seq = NEW.chain_seq, hash = NEW.row_hash;
    RETURN NEW;
END $$;

-- Chain the rows written before this migration, in id order (nothing else writes meanwhile: ALTER TABLE
-- above holds the table's exclusive lock until this transaction commits).
ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update;
DO $$
DECLARE
    r    audit_events%ROWTYPE;
    n    bigint := 0;
    link bytea := decode(repeat('00', 32), 'hex');
BEGIN
    FOR r IN SELECT * FROM audit_events ORDER BY id LOOP
        n := n + 1;
        UPDATE audit_events SET chain_seq = n, prev_hash = link,
               row_hash = credgate_audit_link(link, credgate_audit_canonical(
                   n, r.id, r.at, r.actor, r.actor_id, r.auth_method, r.action,
                   r.target_type, r.target, r.changes, r.request_id, r.source))
         WHERE id = r.id
        RETURNING row_hash INTO link;
    END LOOP;
    INSERT INTO audit_chain_head (seq, hash) VALUES (n, link);
END $$;
ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update;

ALTER TABLE audit_events
    ALTER COLUMN chain_seq SET NOT NULL,
    ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN row_hash SET NOT NULL;
CREATE UNIQUE INDEX audit_events_chain_seq_idx ON audit_events (chain_seq);

CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION credgate_audit_chain();

-- The head only ever moves with an insert; like the log itself it refuses UPDATE, DELETE and TRUNCATE
-- from anyone else (the chain trigger updates it with this trigger seeing pg_trigger_depth() > 1).
CREATE FUNCTION credgate_audit_head_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND pg_trigger_depth() > 1 THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_chain_head only moves when an audit event is inserted: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_chain_head_guard BEFORE UPDATE OR DELETE ON audit_chain_head
    FOR EACH ROW EXECUTE FUNCTION credgate_audit_head_guard();
CREATE TRIGGER audit_chain_head_no_truncate BEFORE TRUNCATE ON audit_chain_head
    FOR EACH STATEMENT EXECUTE FUNCTION credgate_audit_head_guard();
