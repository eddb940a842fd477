"""Credential formats: generate, parse and checksum tokens and key pairs (pure, no I/O)."""

from __future__ import annotations

import hmac
import secrets
import zlib
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "ALPHABET",
    "CHECKSUM_LENGTH",
    "CLIENT_ID_LENGTH",
    "CLIENT_ID_PREFIX",
    "KEY_SECRET_LENGTH",
    "KEY_SECRET_PREFIX",
    "LEGACY_MAX_LENGTH",
    "LEGACY_MIN_LENGTH",
    "PUBLIC_ID_LENGTH",
    "TOKEN_LENGTH",
    "TOKEN_PREFIX",
    "CredentialKind",
    "Presented",
    "PresentedLegacy",
    "client_id_for",
    "generate_key_secret",
    "generate_token",
    "is_legacy_client_id",
    "is_legacy_token",
    "is_public_id",
    "new_public_id",
    "parse_client_id",
    "parse_key_pair",
    "parse_key_secret",
    "parse_legacy_key_pair",
    "parse_legacy_token",
    "parse_token",
]

CredentialKind = Literal["token", "key"]

ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# 12 base62 chars = about 71 bits: collisions are negligible and ids are not guessable.
PUBLIC_ID_LENGTH: Final = 12
# 62**6 > 2**32, so every CRC32 fits in six characters.
CHECKSUM_LENGTH: Final = 6
# 26 base62 chars = about 154 bits; 32 chars = about 190 bits (both well above 128).
_TOKEN_SECRET_LENGTH: Final = 26
_KEY_SECRET_RANDOM_LENGTH: Final = 32

# Recognisable prefixes so that leaked credentials can be found by secret scanners
# (they are public format markers, not passwords).
TOKEN_PREFIX: Final = "cgt_"
CLIENT_ID_PREFIX: Final = "cgk_"
KEY_SECRET_PREFIX: Final = "cgs_"

TOKEN_LENGTH: Final = len(TOKEN_PREFIX) + PUBLIC_ID_LENGTH + _TOKEN_SECRET_LENGTH + CHECKSUM_LENGTH
CLIENT_ID_LENGTH: Final = len(CLIENT_ID_PREFIX) + PUBLIC_ID_LENGTH + CHECKSUM_LENGTH
KEY_SECRET_LENGTH: Final = len(KEY_SECRET_PREFIX) + _KEY_SECRET_RANDOM_LENGTH + CHECKSUM_LENGTH

_PREFIX_LENGTH: Final = 4
_TOKEN_PREFIX_BYTES: Final = TOKEN_PREFIX.encode("ascii")
_CLIENT_ID_PREFIX_BYTES: Final = CLIENT_ID_PREFIX.encode("ascii")
_KEY_SECRET_PREFIX_BYTES: Final = KEY_SECRET_PREFIX.encode("ascii")
_PUBLIC_ID_END: Final = _PREFIX_LENGTH + PUBLIC_ID_LENGTH

# Every two-character base62 string, indexed by value: a checksum is three table look-ups
# instead of six divmods, which keeps a parse to a few microseconds.
_PAIR_BASE: Final = 62 * 62
_BASE62_PAIRS: Final = tuple(high + low for high in ALPHABET for low in ALPHABET)
_BASE62_PAIR_BYTES: Final = tuple(pair.encode("ascii") for pair in _BASE62_PAIRS)


@dataclass(frozen=True, slots=True, repr=False)
class Presented:
    """A well-formed credential as presented by a client; not yet verified."""

    kind: CredentialKind
    public_id: str
    # The whole secret string (the full token, or the full `cgs_` secret): this is what is hashed.
    secret: str

    def __repr__(self) -> str:
        return f"Presented(kind={self.kind!r}, public_id={self.public_id!r})"


@dataclass(frozen=True, slots=True, repr=False)
class PresentedLegacy(Presented):
    """An imported (legacy) key, without an embedded public id (`public_id` is ""); not yet verified.

    gateway.auth resolves it to its credential through the legacy lookup table (gateway.core.legacy).
    """

    # The imported client id of a key pair ("" for a token: the token is the secret).
    client_id: str = ""

    def __repr__(self) -> str:
        return f"PresentedLegacy(kind={self.kind!r})"


def _base62_checksum(raw: bytes) -> str:
    """CRC32 of the ASCII bytes as exactly six base62 characters (zero-padded)."""
    high, low = divmod(zlib.crc32(raw), _PAIR_BASE)
    return _BASE62_PAIRS[high // _PAIR_BASE] + _BASE62_PAIRS[high % _PAIR_BASE] + _BASE62_PAIRS[low]


def _with_checksum(body: str) -> str:
    return body + _base62_checksum(body.encode("ascii"))


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def _well_formed(value: object, prefix: bytes, length: int) -> str | None:
    """The credential string when it has the length, prefix, alphabet and checksum of its kind."""
    # Bytes (a request header) first: the request path's case. The length test comes first so that huge inputs
    # are rejected without being scanned.
    if type(value) is bytes:
        raw = value
    elif isinstance(value, str):
        if len(value) != length or not value.isascii():
            return None
        raw = value.encode("ascii")
    elif isinstance(value, bytes):
        raw = bytes(value)
    else:
        return None
    # bytes.isalnum() is exactly [0-9A-Za-z] (ASCII only) and about three times faster than str.isalnum().
    if len(raw) != length or not raw.startswith(prefix) or not raw[_PREFIX_LENGTH:].isalnum():
        return None
    body_end = length - CHECKSUM_LENGTH
    # _base62_checksum, written out in bytes: parse_token of a header value 2.1 -> 1.5 µs (timeit); the token
    # tests parse what _with_checksum made, so the copy is checked against the original
    high, low = divmod(zlib.crc32(raw[:body_end]), _PAIR_BASE)
    pairs = _BASE62_PAIR_BYTES
    if not hmac.compare_digest(pairs[high // _PAIR_BASE] + pairs[high % _PAIR_BASE] + pairs[low], raw[body_end:]):
        return None
    return raw.decode("ascii")


def new_public_id() -> str:
    """A fresh random public id (12 base62 characters)."""
    return _random_base62(PUBLIC_ID_LENGTH)


def is_public_id(value: object) -> bool:
    """Whether value is a syntactically valid public id (12 base62 characters)."""
    return isinstance(value, str) and len(value) == PUBLIC_ID_LENGTH and value.isascii() and value.isalnum()


def _require_public_id(public_id: str) -> None:
    if not is_public_id(public_id):
        raise ValueError("public id must be 12 base62 characters")


def generate_token(public_id: str) -> str:
    """A new 48-character bearer token for the given public id."""
    _require_public_id(public_id)
    return _with_checksum(TOKEN_PREFIX + public_id + _random_base62(_TOKEN_SECRET_LENGTH))


def client_id_for(public_id: str) -> str:
    """The client id (access key) of a key pair with the given public id."""
    _require_public_id(public_id)
    return _with_checksum(CLIENT_ID_PREFIX + public_id)


def generate_key_secret() -> str:
    """A new 42-character key-pair secret."""
    return _with_checksum(KEY_SECRET_PREFIX + _random_base62(_KEY_SECRET_RANDOM_LENGTH))


def token_shape(value: bytes) -> bytes | None:
    """The public id of a value with a token's length and prefix, else None. The alphabet and checksum are not
    tested: only for a check that needs no more (gateway.auth.Authenticator.remembered)."""
    if len(value) != TOKEN_LENGTH or not value.startswith(_TOKEN_PREFIX_BYTES):
        return None
    return value[_PREFIX_LENGTH:_PUBLIC_ID_END]


def key_pair_shape(client_id: bytes, secret: bytes) -> bytes | None:
    """token_shape for a key pair: the client id's public id when both halves have their length and prefix."""
    if (
        len(client_id) != CLIENT_ID_LENGTH
        or len(secret) != KEY_SECRET_LENGTH
        or not client_id.startswith(_CLIENT_ID_PREFIX_BYTES)
        or not secret.startswith(_KEY_SECRET_PREFIX_BYTES)
    ):
        return None
    return client_id[_PREFIX_LENGTH:_PUBLIC_ID_END]


def parse_token(value: object) -> Presented | None:
    """The presented token when value is a well-formed token, else None; never raises."""
    text = _well_formed(value, _TOKEN_PREFIX_BYTES, TOKEN_LENGTH)
    if text is None:
        return None
    return Presented("token", text[_PREFIX_LENGTH:_PUBLIC_ID_END], text)


def parse_client_id(value: object) -> str | None:
    """The public id of a well-formed client id, else None; never raises."""
    text = _well_formed(value, _CLIENT_ID_PREFIX_BYTES, CLIENT_ID_LENGTH)
    if text is None:
        return None
    return text[_PREFIX_LENGTH:_PUBLIC_ID_END]


def parse_key_secret(value: object) -> str | None:
    """The secret string when value is a well-formed key-pair secret, else None; never raises."""
    return _well_formed(value, _KEY_SECRET_PREFIX_BYTES, KEY_SECRET_LENGTH)


def parse_key_pair(client_id: object, secret: object) -> Presented | None:
    """The presented key pair when both halves are well-formed, else None; never raises."""
    public_id = parse_client_id(client_id)
    if public_id is None:
        return None
    secret_text = parse_key_secret(secret)
    if secret_text is None:
        return None
    return Presented("key", public_id, secret_text)


# --- imported (legacy) keys ---------------------------------------------------------------------------------

# An imported token or key-pair secret: 16 to 256 visible ASCII characters (shorter keys are refused at import:
# they are too weak to keep). A client id: 1 to 128, without ':' (HTTP Basic splits on the first colon).
LEGACY_MIN_LENGTH: Final = 16
LEGACY_MAX_LENGTH: Final = 256
LEGACY_CLIENT_ID_MAX_LENGTH: Final = 128
# A string that starts like one of ours, `cg?_` in any case (cgt_, cgk_, cgs_, cga_ and any future one), is
# ours and malformed: never looked up as a legacy key, and never accepted as one at import.


def _visible(raw: bytes, shortest: int, longest: int) -> bool:
    return shortest <= len(raw) <= longest and raw.isascii() and min(raw) > 0x20 and max(raw) < 0x7F


def _ours(raw: bytes) -> bool:
    return raw[:2].lower() == b"cg" and raw[3:4] == b"_"


def _as_bytes(value: str | bytes) -> bytes | None:
    if isinstance(value, bytes):
        return value
    return value.encode("ascii") if value.isascii() else None


def is_legacy_token(value: str | bytes) -> bool:
    """Whether value may be an imported token (or key-pair secret): visible ASCII, 16-256, not credgate-shaped."""
    raw = _as_bytes(value)
    return raw is not None and _visible(raw, LEGACY_MIN_LENGTH, LEGACY_MAX_LENGTH) and not _ours(raw)


def is_legacy_client_id(value: str | bytes) -> bool:
    """Whether value may be an imported client id: visible ASCII without ':', 1-128, not credgate-shaped."""
    raw = _as_bytes(value)
    return (raw is not None and _visible(raw, 1, LEGACY_CLIENT_ID_MAX_LENGTH) and b":" not in raw
            and not _ours(raw))


def parse_legacy_token(value: bytes) -> PresentedLegacy | None:
    """The presented imported token when value is shaped like one, else None; never raises."""
    if not is_legacy_token(value):
        return None
    return PresentedLegacy("token", "", value.decode("ascii"))


def parse_legacy_key_pair(client_id: bytes, secret: bytes) -> PresentedLegacy | None:
    """An imported key pair (its secret may already be a rotated `cgs_` one), else None; never raises."""
    if not is_legacy_client_id(client_id):
        return None
    if parse_key_secret(secret) is None and not is_legacy_token(secret):
        return None
    return PresentedLegacy("key", "", secret.decode("ascii"), client_id.decode("ascii"))
