-- Imported legacy keys (issue 16): clients keep sending a key that has no credgate prefix or checksum.
-- Every imported credential gets an ordinary public id (caches, invalidation, audit and the API work
-- unchanged); credential_legacy_lookup maps what a client sends to that id (gateway.core.legacy).

-- true while the credential's secret is still the imported key; a rotation (credgate format) clears it.
ALTER TABLE credentials ADD COLUMN legacy boolean NOT NULL DEFAULT false;

-- Until its first use, an imported key known only by its legacy hash keeps that hash, tagged with its
-- scheme ('legacy$sha256$<hex>', 'legacy$bcrypt$$2b$...', ...). The gateway replaces it with argon2id
-- on the first successful use; a rotation with a grace period may move it to previous_secret_hash.
ALTER TABLE credentials DROP CONSTRAINT credentials_secret_hash_check;
ALTER TABLE credentials ADD CONSTRAINT credentials_secret_hash_check CHECK (
    secret_hash LIKE '$argon2id$%'
    OR (legacy AND secret_hash ~ '^legacy\$(sha256|sha512|bcrypt|pbkdf2_sha256)\$'));
ALTER TABLE credentials DROP CONSTRAINT credentials_previous_secret_hash_check;
ALTER TABLE credentials ADD CONSTRAINT credentials_previous_secret_hash_check CHECK (
    previous_secret_hash IS NULL OR previous_secret_hash LIKE '$argon2id$%'
    OR previous_secret_hash ~ '^legacy\$(sha256|sha512|bcrypt|pbkdf2_sha256)\$');

-- lookup: 'h:<hex HMAC-SHA256 of the token under the server key>' (plaintext imports, and every token
-- after its first use), 'sha256:<hex>' / 'sha512:<hex>' (an unsalted legacy hash of the token: itself a
-- deterministic index) or 'k:<imported client id>' (key pairs, whatever the scheme of their secret).
CREATE TABLE credential_legacy_lookup (
    lookup        text PRIMARY KEY CHECK (lookup ~ '^(h|sha256|sha512|k):.'),
    credential_id bigint NOT NULL REFERENCES credentials (id) ON DELETE CASCADE
);
CREATE INDEX credential_legacy_lookup_credential_idx ON credential_legacy_lookup (credential_id);

-- A rotation gives the credential a credgate-format secret: it is no longer legacy. Without a grace
-- period the imported key stops at once, so what mapped it to the credential goes too.
CREATE FUNCTION credgate_legacy_rotated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.legacy AND NEW.rotated_at IS DISTINCT FROM OLD.rotated_at THEN
        NEW.legacy := false;
        IF NEW.previous_secret_hash IS NULL THEN
            DELETE FROM credential_legacy_lookup WHERE credential_id = NEW.id;
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER credentials_legacy_rotated BEFORE UPDATE OF rotated_at ON credentials
    FOR EACH ROW EXECUTE FUNCTION credgate_legacy_rotated();
