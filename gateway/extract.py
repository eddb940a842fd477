"""Credential extraction (pure): exactly one of Bearer, Basic, or the accessKey + secretKey pair.

Returns a Presented credential, or a reason for refusing: `missing` (no credential at all),
`malformed` (a credential that cannot be ours: 401 without any I/O) or `conflict` (two credentials,
a repeated credential header or half a pair: 400 invalid_request). Query strings are never looked at.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass
from typing import Literal

from gateway.credentials import Presented, parse_key_pair, parse_token

Method = Literal["bearer", "basic", "headers"]


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: Literal["missing", "malformed", "conflict"]
    method: Method | None
    description: str


MISSING = Refusal("missing", None, "")
TWO_CREDENTIALS = Refusal("conflict", None, "send exactly one credential")
HALF_PAIR = Refusal("conflict", "headers", "accessKey and secretKey must be sent together")
REPEATED = Refusal("conflict", None, "credential header repeated")


def extract(
    authorization: tuple[bytes, ...], access_key: tuple[bytes, ...], secret_key: tuple[bytes, ...]
) -> tuple[Presented, Method] | Refusal:
    if len(authorization) > 1 or len(access_key) > 1 or len(secret_key) > 1:
        return REPEATED
    if authorization:
        if access_key or secret_key:
            return TWO_CREDENTIALS
        return _from_authorization(authorization[0])
    if access_key or secret_key:
        if not (access_key and secret_key):
            return HALF_PAIR
        presented = parse_key_pair(access_key[0].strip(), secret_key[0].strip())
        if presented is None:
            return Refusal("malformed", "headers", "")
        return presented, "headers"
    return MISSING


def _from_authorization(value: bytes) -> tuple[Presented, Method] | Refusal:
    scheme, _, rest = value.strip().partition(b" ")
    credentials = rest.strip(b" ")
    lowered = scheme.lower()
    if lowered == b"bearer":
        token = parse_token(credentials) if len(credentials) == 48 else None
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
    return parse_key_pair(client_id, secret)
