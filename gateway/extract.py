"""Credential extraction (pure): exactly one of Bearer, Basic, or the accessKey + secretKey pair.

Returns a Presented credential, or a reason for refusing: `missing` (no credential at all),
`malformed` (a credential that cannot be ours: 401 without any I/O) or `conflict` (two credentials,
a repeated credential header or half a pair: 400 invalid_request). Query strings are never looked at.
With access_tokens=True (the gateway), a Bearer OAuth2 access token is returned as a
PresentedAccessToken (method "oauth"); its signature is checked by gateway.tokens. A token or key pair that is
not credgate-shaped, but shaped like an imported key (gateway.core.formats), is a PresentedLegacy: a Presented
without a public id, which verification resolves through the legacy lookup (gateway.auth).
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass
from typing import Literal, overload

from gateway.core.formats import (
    CredentialKind,
    Presented,
    key_pair_shape,
    parse_key_pair,
    parse_legacy_key_pair,
    parse_legacy_token,
    parse_token,
    token_shape,
)
from gateway.tokens import looks_like_access_token

Method = Literal["bearer", "basic", "headers", "oauth"]


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: Literal["missing", "malformed", "conflict"]
    method: Method | None
    description: str


MISSING = Refusal("missing", None, "")
TWO_CREDENTIALS = Refusal("conflict", None, "send exactly one credential")
HALF_PAIR = Refusal("conflict", "headers", "accessKey and secretKey must be sent together")
REPEATED = Refusal("conflict", None, "credential header repeated")


@dataclass(frozen=True, slots=True, repr=False)
class PresentedAccessToken:
    """A Bearer value shaped like an OAuth2 access token (prefix, length, alphabet); not yet verified."""

    value: bytes

    def __repr__(self) -> str:
        return "PresentedAccessToken(...)"


@overload
def extract(
    authorization: tuple[bytes, ...],
    access_key: tuple[bytes, ...],
    secret_key: tuple[bytes, ...],
    access_tokens: Literal[False] = False,
) -> tuple[Presented, Method] | Refusal: ...


@overload
def extract(
    authorization: tuple[bytes, ...],
    access_key: tuple[bytes, ...],
    secret_key: tuple[bytes, ...],
    access_tokens: bool,
) -> tuple[Presented | PresentedAccessToken, Method] | Refusal: ...


def extract(
    authorization: tuple[bytes, ...],
    access_key: tuple[bytes, ...],
    secret_key: tuple[bytes, ...],
    access_tokens: bool = False,
) -> tuple[Presented | PresentedAccessToken, Method] | Refusal:
    if len(authorization) > 1 or len(access_key) > 1 or len(secret_key) > 1:
        return REPEATED
    if authorization:
        if access_key or secret_key:
            return TWO_CREDENTIALS
        return _from_authorization(authorization[0], access_tokens)
    if access_key or secret_key:
        if not (access_key and secret_key):
            return HALF_PAIR
        client_id, secret = access_key[0].strip(), secret_key[0].strip()
        presented = parse_key_pair(client_id, secret) or parse_legacy_key_pair(client_id, secret)
        if presented is None:
            return Refusal("malformed", "headers", "")
        return presented, "headers"
    return MISSING


def shortcut(
    authorization: tuple[bytes, ...], access_key: tuple[bytes, ...], secret_key: tuple[bytes, ...]
) -> tuple[CredentialKind, bytes, bytes, Method] | None:
    """(kind, public id, secret, method) when the headers hold exactly one credgate-shaped credential in its
    plain form (`Bearer <token>`, `Basic <base64 of id:secret>` or the two key-pair headers), shape only: for
    gateway.auth.Authenticator.remembered, which answers only for a secret memory knows verified. None:
    anything else, which extract() decides."""
    if authorization:
        if len(authorization) != 1 or access_key or secret_key:
            return None
        value = authorization[0]
        scheme = value[:6].lower()
        if scheme == b"bearer" and value[6:7] == b" ":
            token = value[7:]
            public = token_shape(token)
            return None if public is None else ("token", public, token, "bearer")
        if scheme == b"basic " and len(value) <= 512:
            try:
                client_id, _, secret = b64decode(value[6:], validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return None
            public = key_pair_shape(client_id, secret)
            return None if public is None else ("key", public, secret, "basic")
        return None
    if len(access_key) == 1 and len(secret_key) == 1:
        public = key_pair_shape(access_key[0], secret_key[0])
        return None if public is None else ("key", public, secret_key[0], "headers")
    return None


def _from_authorization(value: bytes, access_tokens: bool) -> tuple[Presented | PresentedAccessToken, Method] | Refusal:
    scheme, _, rest = value.strip().partition(b" ")
    credentials = rest.strip(b" ")
    lowered = scheme.lower()
    if lowered == b"bearer":
        if access_tokens and looks_like_access_token(credentials):
            return PresentedAccessToken(credentials), "oauth"
        token = parse_token(credentials) if len(credentials) == 48 else None
        if token is None:
            token = parse_legacy_token(credentials)
        if token is None:
            return Refusal("malformed", "bearer", "")
        return token, "bearer"
    if lowered == b"basic":
        presented = _basic(credentials)
        if presented is None:
            return Refusal("malformed", "basic", "")
        return presented, "basic"
    # Another scheme (Digest, Negotiate...): not a credential we accept; answer as if none was sent.
    return Refusal("missing", None, "")


def _basic(credentials: bytes) -> Presented | None:
    """RFC 7617: base64(user-id ":" password), split on the first colon."""
    if not credentials or len(credentials) > 512:
        return None
    try:
        decoded = b64decode(credentials, validate=True)
    except (binascii.Error, ValueError):
        return None
    client_id, sep, secret = decoded.partition(b":")
    if not sep:
        return None
    return parse_key_pair(client_id, secret) or parse_legacy_key_pair(client_id, secret)
