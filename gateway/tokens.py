"""OAuth2 access tokens: a compact HMAC-signed format bound to a credential's current secret (pure, no I/O).

A token is `cga_` + base64url(body + tag). The body names the signing key id, the credential's public id,
the fingerprint of the credential's current secret hash, a random jti, iat, exp and the granted scope; the
tag is HMAC-SHA256 over the body under a key derived from the server key and the key id. Nothing is stored
per token: the signature proves the client authenticated at the token endpoint, the fingerprint ties the
token to the secret it was issued for (a rotation rejects it), and the credential's cached record decides
the rest (revoked, expired, suspended, groups; see gateway.grants).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from gateway.core.settings import Settings

__all__ = [
    "ACCESS_TOKEN_PREFIX",
    "AccessToken",
    "SigningKeys",
    "looks_like_access_token",
]

# A recognisable prefix (secret scanners, and extraction tells access tokens from 48-char credential tokens).
ACCESS_TOKEN_PREFIX: Final = "cga_"
_PREFIX_BYTES: Final = ACCESS_TOKEN_PREFIX.encode("ascii")
_VERSION: Final = 1
_TAG_LENGTH: Final = 32  # full HMAC-SHA256
_JTI_LENGTH: Final = 16
_FP_LENGTH: Final = 8  # entry.fingerprint() is 16 hex characters
_PUBLIC_ID_LENGTH: Final = 12
# version, kid length | kid | public id, fingerprint, jti, iat, exp | scope | tag
_FIXED: Final = struct.Struct(f">{_PUBLIC_ID_LENGTH}s{_FP_LENGTH}s{_JTI_LENGTH}sII")
_MIN_RAW: Final = 2 + 1 + _FIXED.size + _TAG_LENGTH
# Bounds the work an oversized header can cause; a token with every group of a busy principal stays far below.
MAX_TOKEN_LENGTH: Final = 4096
_B64URL: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_MIN_LENGTH: Final = len(_PREFIX_BYTES) + (_MIN_RAW * 4 + 2) // 3
_MAX_KID_BYTES: Final = 64
# Domain separation: these keys sign access tokens and nothing else derived from the server key.
_KEY_DOMAIN: Final = b"credgate/oauth-access-token-key/v1\x00"
_TAG_DOMAIN: Final = b"credgate/oauth-access-token/v1\x00"


@dataclass(frozen=True, slots=True, repr=False)
class AccessToken:
    """A token whose signature verified; expiry, denylist and credential state are checked by the verifier."""

    kid: str
    public_id: str
    fingerprint: str  # hex, as entry.fingerprint() of the secret hash the client authenticated against
    jti: str  # hex
    issued_at: int  # epoch seconds
    expires_at: int
    scope: frozenset[str]

    def __repr__(self) -> str:
        return f"AccessToken(public_id={self.public_id!r}, jti={self.jti[:8]}..., exp={self.expires_at})"

    @property
    def scope_text(self) -> str:
        return " ".join(sorted(self.scope))


def looks_like_access_token(value: bytes) -> bool:
    """Cheap shape test (prefix, length, alphabet) used by extraction; the signature is checked later."""
    return (
        value.startswith(_PREFIX_BYTES)
        and _MIN_LENGTH <= len(value) <= MAX_TOKEN_LENGTH
        and not value[len(_PREFIX_BYTES) :].translate(None, _B64URL)
    )


def _derive(material: bytes, kid: str) -> bytes:
    return hmac.digest(material, _KEY_DOMAIN + kid.encode("utf-8"), hashlib.sha256)


class SigningKeys:
    """The current signing key (derived from the server key under `signing_key_id`) and retired ones.

    `previous` entries are "KID:SECRET": tokens signed under KID (derived from SECRET the same way, so
    SECRET is the server key that was in use then) keep verifying until the entry is removed.
    """

    def __init__(self, server_key: bytes, current_kid: str, previous: Iterable[str] = ()) -> None:
        if not server_key:
            raise ValueError("server key must not be empty")
        self.current_kid = current_kid
        self._current = self._check_kid(current_kid)
        self._keys: dict[bytes, bytes] = {self._current: _derive(server_key, current_kid)}
        for item in previous:
            kid, _, material = item.partition(":")
            encoded = self._check_kid(kid)
            if encoded in self._keys:
                raise ValueError(f"oauth.previous_signing_keys: key id {kid!r} is listed twice or is the current one")
            self._keys[encoded] = _derive(material.encode("utf-8"), kid)

    @classmethod
    def from_settings(cls, settings: Settings) -> SigningKeys:
        oauth = settings.oauth
        return cls(settings.secret_key_bytes, oauth.signing_key_id, oauth.previous_signing_keys)

    @staticmethod
    def _check_kid(kid: str) -> bytes:
        encoded = kid.encode("utf-8")
        if not 0 < len(encoded) <= _MAX_KID_BYTES:
            raise ValueError(f"oauth signing key id {kid!r} must be 1-{_MAX_KID_BYTES} bytes")
        return encoded

    def __repr__(self) -> str:
        return f"SigningKeys(current={self.current_kid!r}, known={len(self._keys)})"

    def sign(
        self, public_id: str, fingerprint: str, scope: Iterable[str], issued_at: int, expires_at: int
    ) -> tuple[str, AccessToken]:
        """A new token string and what it says."""
        jti = secrets.token_bytes(_JTI_LENGTH)
        groups = frozenset(scope)
        body = b"".join(
            (
                bytes((_VERSION, len(self._current))),
                self._current,
                _FIXED.pack(public_id.encode("ascii"), bytes.fromhex(fingerprint), jti, issued_at, expires_at),
                " ".join(sorted(groups)).encode("utf-8"),
            )
        )
        tag = hmac.digest(self._keys[self._current], _TAG_DOMAIN + body, hashlib.sha256)
        text = ACCESS_TOKEN_PREFIX + base64.urlsafe_b64encode(body + tag).rstrip(b"=").decode("ascii")
        return text, AccessToken(self.current_kid, public_id, fingerprint, jti.hex(), issued_at, expires_at, groups)

    def parse(self, value: bytes | str) -> AccessToken | None:
        """The token when it is well-formed and its signature verifies under a known key; never raises, no I/O."""
        raw_value = value.encode("ascii", "replace") if isinstance(value, str) else value
        if not looks_like_access_token(raw_value):
            return None
        encoded = raw_value[len(_PREFIX_BYTES) :]
        try:
            raw = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):
            return None
        # One spelling per token: trailing bits that decode to the same bytes would make a second one.
        if len(raw) < _MIN_RAW or base64.urlsafe_b64encode(raw).rstrip(b"=") != encoded:
            return None
        if raw[0] != _VERSION:
            return None
        kid_end = 2 + raw[1]
        key = self._keys.get(raw[2:kid_end])
        fixed_end = kid_end + _FIXED.size
        if key is None or len(raw) < fixed_end + _TAG_LENGTH:
            return None
        body, tag = raw[:-_TAG_LENGTH], raw[-_TAG_LENGTH:]
        if not hmac.compare_digest(hmac.digest(key, _TAG_DOMAIN + body, hashlib.sha256), tag):
            return None
        public_id, fp, jti, issued_at, expires_at = _FIXED.unpack_from(raw, kid_end)
        try:
            scope_text = body[fixed_end:].decode("utf-8")
            kid = raw[2:kid_end].decode("utf-8")
            public_text = public_id.decode("ascii")
        except UnicodeDecodeError:  # pragma: no cover - only a signer bug could produce this
            return None
        scope = frozenset(scope_text.split(" ")) if scope_text else frozenset()
        return AccessToken(kid, public_text, fp.hex(), jti.hex(), issued_at, expires_at, scope)
