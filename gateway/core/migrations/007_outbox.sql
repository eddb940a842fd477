-- Lifecycle events for owners (issue 16): a transactional outbox and its webhook deliveries.
-- An event row is written in the transaction of the change it reports, so a committed change always has its
-- event; the admin service's delivery worker (admin.webhooks) fans each event out to one delivery row per
-- destination URL and posts it until it is accepted or webhooks.retry_for has passed.

-- A principal's own webhook URL: it receives the events of the credentials it owns (NULL: none).
ALTER TABLE principals ADD COLUMN webhook_url text
    CHECK (webhook_url IS NULL OR (webhook_url ~ '^https?://[^/?#]+' AND length(webhook_url) <= 2000));

CREATE TABLE webhook_events (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),  -- Credgate-Webhook-Id: receivers dedupe on it
    type          text NOT NULL CHECK (type ~ '^credential\.[a-z_]+$'),
    credential_id bigint REFERENCES credentials (id) ON DELETE SET NULL,
    owner_id      bigint REFERENCES principals (id) ON DELETE SET NULL,
    -- what makes an event happen once: expiring per credential, threshold and expiry time, expired per
    -- credential and expiry time, rate_limited per credential and hour. NULL for one-off changes.
    dedup_key     text UNIQUE,
    data          jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    fanned_out    boolean NOT NULL DEFAULT false
);
CREATE INDEX webhook_events_pending_idx ON webhook_events (id) WHERE NOT fanned_out;
CREATE INDEX webhook_events_created_idx ON webhook_events (created_at);  -- pruning

CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    event_id        bigint NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    url             text NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    -- when the next attempt is due; a claimed row is pushed past the attempt's timeout (its lease), so a
    -- worker that dies mid-post leaves a row that becomes due again by itself
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,  -- the receiver's HTTP status of the last attempt (NULL: no answer)
    last_error      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    UNIQUE (event_id, url)
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_status_idx ON webhook_deliveries (status, id);

-- One event, its data built from the credential row (owner, kind, name, expiry) plus `extra`; the one
-- writer of webhook_events, used by the audit trigger, the expiry scan and the gateway's rate_limited.
CREATE FUNCTION credgate_webhook_event(event_type text, cred_id bigint, actor text, at timestamptz,
                                       extra jsonb, dedup text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO webhook_events (type, credential_id, owner_id, dedup_key, data, created_at)
    SELECT event_type, c.id, c.owner_id, dedup,
           jsonb_build_object('credential', jsonb_build_object(
               'id', c.public_id, 'kind', c.kind, 'name', c.name, 'owner', o.name, 'expires_at', c.expires_at),
               'actor', actor, 'at', at) || extra,
           at
    FROM credentials c JOIN principals o ON o.id = c.owner_id
    WHERE c.id = cred_id
    ON CONFLICT (dedup_key) DO NOTHING;
$$;

-- Every writer (API, UI, CLI, gateway, psql) audits a lifecycle change in its transaction: the event rides on
-- that audit row, so it commits, or rolls back, with the change.
CREATE FUNCTION credgate_audit_to_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event_type text := CASE NEW.action
        WHEN 'credential.create' THEN 'credential.created'
        WHEN 'credential.rotate' THEN 'credential.rotated'
        WHEN 'credential.revoke' THEN 'credential.revoked'
        WHEN 'credential.exposed' THEN 'credential.exposed'
        WHEN 'principal.delete' THEN 'credential.revoked' END;
    extra jsonb := '{}'::jsonb;
    cred record;
BEGIN
    IF NEW.action = 'principal.delete' THEN  -- deleting an owner revokes its credentials
        FOR cred IN SELECT c.id FROM credentials c
                    WHERE c.public_id IN (SELECT jsonb_array_elements_text(
                        coalesce(NEW.changes -> 'revoked_credentials', '[]'::jsonb))) LOOP
            PERFORM credgate_webhook_event(event_type, cred.id, NEW.actor, NEW.at, '{"reason": "owner deleted"}', NULL);
        END LOOP;
        RETURN NULL;
    END IF;
    IF NEW.action = 'credential.exposed' THEN  -- where the secret was found, as the leak report gave it
        extra := jsonb_strip_nulls(jsonb_build_object('url', NEW.changes -> 'url', 'source', NEW.changes -> 'source'));
    END IF;
    PERFORM credgate_webhook_event(event_type, c.id, NEW.actor, NEW.at, extra, NULL)
    FROM credentials c WHERE c.public_id = NEW.target;
    RETURN NULL;
END $$;
CREATE TRIGGER audit_events_outbox AFTER INSERT ON audit_events FOR EACH ROW
    WHEN (NEW.action IN ('credential.create', 'credential.rotate', 'credential.revoke', 'credential.exposed',
                         'principal.delete'))
    EXECUTE FUNCTION credgate_audit_to_outbox();
