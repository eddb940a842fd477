-- OAuth2 access-token revocation (RFC 7009). Access tokens are stateless; a single revoked token is
-- remembered here only until its natural expiry, and every gateway keeps the live rows in memory.

CREATE TABLE oauth_revoked_tokens (
    jti        text PRIMARY KEY CHECK (jti ~ '^[0-9a-f]{32}$'),
    public_id  text NOT NULL REFERENCES credentials (public_id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX oauth_revoked_tokens_credential_idx ON oauth_revoked_tokens (public_id, expires_at);
CREATE INDEX oauth_revoked_tokens_expires_idx ON oauth_revoked_tokens (expires_at);

-- Bounds the denylist per client: once a credential has many live revoked tokens, further revocations
-- become one watermark, "every token of this credential issued at or before issued_before is revoked".
CREATE TABLE oauth_revoked_before (
    public_id     text PRIMARY KEY REFERENCES credentials (public_id) ON DELETE CASCADE,
    issued_before bigint NOT NULL,  -- epoch seconds, compared with a token's iat
    expires_at    timestamptz NOT NULL,  -- no token it covers lives longer
    revoked_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX oauth_revoked_before_expires_idx ON oauth_revoked_before (expires_at);

-- Every gateway hears of a revocation on the credgate_auth channel, even for a row written with psql.
-- Payload: {"t": "j", "id": <jti>, "exp": <epoch>, "ts": <epoch>} for one token,
--          {"t": "j", "id": <public_id>, "before": <epoch>, "exp": <epoch>, "ts": <epoch>} for a watermark.
CREATE FUNCTION credgate_token_revoked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'oauth_revoked_tokens' THEN
        PERFORM pg_notify('credgate_auth', json_build_object(
            't', 'j', 'id', NEW.jti, 'exp', extract(epoch FROM NEW.expires_at),
            'ts', extract(epoch FROM clock_timestamp()))::text);
    ELSE
        PERFORM pg_notify('credgate_auth', json_build_object(
            't', 'j', 'id', NEW.public_id, 'before', NEW.issued_before, 'exp', extract(epoch FROM NEW.expires_at),
            'ts', extract(epoch FROM clock_timestamp()))::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER oauth_revoked_tokens_notify AFTER INSERT OR UPDATE ON oauth_revoked_tokens
    FOR EACH ROW EXECUTE FUNCTION credgate_token_revoked();
CREATE TRIGGER oauth_revoked_before_notify AFTER INSERT OR UPDATE ON oauth_revoked_before
    FOR EACH ROW EXECUTE FUNCTION credgate_token_revoked();
