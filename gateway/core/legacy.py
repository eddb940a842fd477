"""Imported (legacy) keys: their hash schemes, the lookup keys that find their credential, and their SQL.

A legacy key has no embedded public id, so the gateway finds its credential through
`credential_legacy_lookup` (migration 009), by one of these lookup keys (never by scanning, never by a slow
hash per row):

- `h:<hex>`: HMAC-SHA256 under the server key of the token (plaintext imports, and every token after its
  first use);
- `sha256:<hex>` / `sha512:<hex>`: an unsalted legacy hash of the token, which is itself a deterministic index;
- `k:<client id>`: the imported client id of a key pair, whatever the scheme of its secret (salted schemes,
  bcrypt and pbkdf2_sha256, can only be indexed this way, so bare tokens cannot use them).

Until its first successful use, a key imported as a legacy hash keeps that hash in `secret_hash`, tagged
`legacy$<scheme>$<hash>`; the gateway then stores an argon2id hash instead (`MIGRATE_SECRET`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from typing import Final, Literal

import bcrypt

__all__ = [
    "MIGRATE_SECRET",
    "REINDEX_TOKEN",
    "RESOLVE",
    "SCHEMES",
    "TOKEN_SCHEMES",
    "Scheme",
    "client_lookup",
    "hash_lookup",
    "hash_problem",
    "is_legacy_hash",
    "is_slow",
    "normalise_hash",
    "scheme_of",
    "stored_form",
    "token_lookup",
    "unsalted_lookups",
    "verify",
]

Scheme = Literal["sha256", "sha512", "bcrypt", "pbkdf2_sha256"]
SCHEMES: Final[tuple[Scheme, ...]] = ("sha256", "sha512", "bcrypt", "pbkdf2_sha256")
# Unsalted: the hash of a token is a deterministic index. The salted ones need a key pair's client id.
TOKEN_SCHEMES: Final[tuple[Scheme, ...]] = ("sha256", "sha512")

_STORED_PREFIX: Final = "legacy$"
# Bumping this tag orphans every `h:` lookup key: never change it.
_LOOKUP_DOMAIN: Final = b"credgate/legacy-lookup/v1"
# bcrypt only ever reads the first 72 bytes of a password; the legacy systems truncated silently too.
_BCRYPT_MAX_BYTES: Final = 72
# Django's pbkdf2_sha256 form; iterations bounded so that an imported row cannot make a verification a DoS.
_PBKDF2 = re.compile(r"pbkdf2_sha256\$([1-9][0-9]{0,7})\$([!-#%-~]{1,128})\$([A-Za-z0-9+/]{43}=)")
_PBKDF2_MIN_ITERATIONS: Final = 1000
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|1[0-9])\$[./A-Za-z0-9]{53}")
_HEX = {"sha256": re.compile(r"[0-9a-fA-F]{64}"), "sha512": re.compile(r"[0-9a-fA-F]{128}")}


# --- hashes -------------------------------------------------------------------------------------------------


def hash_problem(scheme: str, value: str) -> str:
    """Why value is not a hash of that scheme ("" when it is one); never quotes the value."""
    if scheme not in SCHEMES:
        return f"scheme must be one of {', '.join(SCHEMES)}"
    if scheme in _HEX:
        digits = len(hashlib.new(scheme).hexdigest())
        return "" if _HEX[scheme].fullmatch(value) else f"a {scheme} hash is {digits} hex digits"
    if scheme == "bcrypt":
        return "" if _BCRYPT.fullmatch(value) else "a bcrypt hash looks like $2b$12$ + 53 characters"
    match = _PBKDF2.fullmatch(value)
    if match is None:
        return "a pbkdf2_sha256 hash looks like pbkdf2_sha256$<iterations>$<salt>$<base64 of 32 bytes>"
    if int(match.group(1)) < _PBKDF2_MIN_ITERATIONS:
        return f"pbkdf2_sha256 needs at least {_PBKDF2_MIN_ITERATIONS} iterations"
    return ""


def normalise_hash(scheme: Scheme, value: str) -> str:
    """The canonical spelling of a valid hash (hex in lower case)."""
    return value.lower() if scheme in _HEX else value


def stored_form(scheme: Scheme, value: str) -> str:
    """What `secret_hash` holds for a key imported as a legacy hash: `legacy$<scheme>$<hash>`."""
    return f"{_STORED_PREFIX}{scheme}${normalise_hash(scheme, value)}"


def is_legacy_hash(stored: str) -> bool:
    return stored.startswith(_STORED_PREFIX)


def scheme_of(stored: str) -> Scheme | None:
    """The scheme of a stored legacy hash, None for anything else (argon2id)."""
    if not is_legacy_hash(stored):
        return None
    scheme = stored[len(_STORED_PREFIX):].partition("$")[0]
    for known in SCHEMES:
        if scheme == known:
            return known
    return None


def is_slow(stored: str) -> bool:
    """Whether verifying against this stored hash is CPU-heavy (run it in a thread)."""
    return scheme_of(stored) in ("bcrypt", "pbkdf2_sha256")


def verify(stored: str, secret: str) -> bool:
    """Whether secret matches a stored legacy hash (constant-time comparisons); False for anything malformed."""
    scheme = scheme_of(stored)
    if scheme is None:
        return False
    value = stored[len(_STORED_PREFIX) + len(scheme) + 1:]
    raw = secret.encode("utf-8", "surrogateescape")
    if scheme in ("sha256", "sha512"):
        return hmac.compare_digest(hashlib.new(scheme, raw).hexdigest(), value)
    if scheme == "bcrypt":
        try:
            return bcrypt.checkpw(raw[:_BCRYPT_MAX_BYTES], value.encode("ascii"))
        except ValueError:
            return False
    match = _PBKDF2.fullmatch(value)
    if match is None:
        return False
    iterations, salt, expected = int(match.group(1)), match.group(2), match.group(3)
    try:
        wanted = base64.b64decode(expected, validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha256", raw, salt.encode("ascii"), iterations), wanted)


# --- lookup keys --------------------------------------------------------------------------------------------


def token_lookup(server_key: bytes, token: str) -> str:
    """The keyed lookup key of a token whose plaintext is known: `h:` + HMAC-SHA256 under the server key."""
    if not server_key:
        raise ValueError("server key must not be empty")
    mac = hmac.new(server_key, _LOOKUP_DOMAIN + token.encode("utf-8", "surrogateescape"), hashlib.sha256)
    return "h:" + mac.hexdigest()


def unsalted_lookups(token: str) -> list[str]:
    """The lookup keys a token imported as an unsalted hash would be filed under (besides its `h:` key)."""
    raw = token.encode("utf-8", "surrogateescape")
    return ["sha256:" + hashlib.sha256(raw).hexdigest(), "sha512:" + hashlib.sha512(raw).hexdigest()]


def hash_lookup(scheme: Scheme, value: str) -> str:
    """The lookup key of a token imported as an unsalted hash (sha256 or sha512)."""
    return f"{scheme}:{normalise_hash(scheme, value)}"


def client_lookup(client_id: str) -> str:
    """The lookup key of a key pair: its imported client id (public, like credgate's own client ids)."""
    return "k:" + client_id


# --- SQL ----------------------------------------------------------------------------------------------------

# The credential a presented legacy key is filed under (PRIMARY KEY lookups only).
RESOLVE = """
SELECT c.public_id, c.kind FROM credential_legacy_lookup l JOIN credentials c ON c.id = l.credential_id
WHERE l.lookup = ANY($1::text[]) LIMIT 1"""
# First use of a key imported as a legacy hash: argon2id replaces it, once (guarded by the old value).
MIGRATE_SECRET = """
UPDATE credentials SET secret_hash = $2, updated_at = now()
WHERE public_id = $1 AND secret_hash = $3 RETURNING id"""
# ... and the token's unsalted hash stops being its index: the keyed digest replaces it.
REINDEX_TOKEN = """
UPDATE credential_legacy_lookup SET lookup = $2 WHERE credential_id = $1 AND lookup ~ '^sha(256|512):'
  AND NOT EXISTS (SELECT 1 FROM credential_legacy_lookup WHERE lookup = $2)"""
# The import (admin.credential_import).
OWNERS_BY_NAME = "SELECT id, name FROM principals WHERE name = ANY($1::text[]) AND deleted_at IS NULL"
TAKEN_LOOKUPS = "SELECT lookup FROM credential_legacy_lookup WHERE lookup = ANY($1::text[])"
INSERT_IMPORTED = """
INSERT INTO credentials (public_id, kind, secret_hash, name, owner_id, created_by, expires_at, legacy)
SELECT u.public_id, u.kind, u.secret_hash, u.name, u.owner_id, $8, u.expires_at, true
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::timestamptz[], $7::int[])
     AS u(public_id, kind, secret_hash, name, owner_id, expires_at, ord)
ORDER BY u.ord RETURNING id, public_id"""
INSERT_LOOKUPS = """
INSERT INTO credential_legacy_lookup (lookup, credential_id)
SELECT u.lookup, c.id FROM unnest($1::text[], $2::text[]) AS u(lookup, public_id)
JOIN credentials c ON c.public_id = u.public_id"""
