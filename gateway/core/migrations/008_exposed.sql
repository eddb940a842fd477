-- Leaked-key disclosure (issue 16): why a credential was revoked and, when it was found exposed, where.
-- NULL reason: revoked by an administrator (or not revoked). The gateways need neither column: revoked_at,
-- set in the same UPDATE, is what the change trigger watches and what the gateways enforce.
ALTER TABLE credentials
    ADD COLUMN revoked_reason text CHECK (revoked_reason IN ('exposed')),
    ADD COLUMN exposed_url text CHECK (length(exposed_url) <= 2048);
