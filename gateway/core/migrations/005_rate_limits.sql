-- Rate limits and quotas per credential (issue 14): 'N/second|minute|hour' and 'N/day|month', NULL for none.
-- The patterns are gateway.core.rate_policy's RATE_PATTERN and QUOTA_PATTERN.
ALTER TABLE credentials
    ADD COLUMN rate_limit text CHECK (rate_limit ~ '^[1-9][0-9]{0,8}/(second|minute|hour)$'),
    ADD COLUMN quota text CHECK (quota ~ '^[1-9][0-9]{0,8}/(day|month)$');

-- A change of limit reaches every gateway like any other credential change: the trigger now watches both.
CREATE OR REPLACE FUNCTION credgate_credentials_changed() RETURNS trigger LANGUAGE plpgsql AS $$
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
            NEW.previous_secret_hash, NEW.previous_expires_at, NEW.kind, NEW.public_id, NEW.rate_limit, NEW.quota)
        IS DISTINCT FROM ROW(OLD.secret_hash, OLD.owner_id, OLD.expires_at, OLD.revoked_at, OLD.name,
            OLD.previous_secret_hash, OLD.previous_expires_at, OLD.kind, OLD.public_id, OLD.rate_limit, OLD.quota) THEN
        PERFORM credgate_notify('c', NEW.public_id);
    END IF;
    RETURN NEW;
END $$;
