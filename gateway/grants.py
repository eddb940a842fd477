"""Access-token verification: verify(value) -> Grant, one HMAC and dict lookups when memory knows the credential.

A token is as good as its credential: the same key pair, the same current secret, the credential's status
now, the owner's groups now narrowed to the granted scope, and not revoked by itself (the denylist).
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Final

from gateway.denylist import TokenDenylist
from gateway.entry import INVALID, UNAVAILABLE, CachedCredential, Negative, Verdict, status_of
from gateway.lookup import CredentialLookup
from gateway.tokens import AccessToken, SigningKeys

Found = CachedCredential | Negative | Verdict


@dataclass(slots=True, frozen=True)
class Grant(Verdict):
    """A Verdict for an access token: on `ok`, the groups it grants (its scope within the owner's groups now)."""

    scope: frozenset[str] = frozenset()
    token: AccessToken | None = None


TOKEN_EXPIRED: Final = Grant("token_expired")
INVALID_TOKEN: Final = Grant("invalid")
# How long a request waits for this worker's first denylist load before answering 503.
_DENYLIST_WAIT: Final = 2.0
# Tokens whose signature verified, remembered by a keyed digest (never the token itself: it is a bearer
# secret): a client reuses its token for an hour, and one HMAC plus a dict lookup is cheaper than base64,
# HMAC and parsing. Cleared when full, so unique tokens cost bounded memory.
_VERIFIED_CACHE_SIZE: Final = 16384


class AccessTokenVerifier:
    """verify(value) -> Grant now (one HMAC, dict lookups) when memory knows the credential, else an awaitable."""

    def __init__(self, keys: SigningKeys, lookup: CredentialLookup, denylist: TokenDenylist) -> None:
        self.keys = keys
        self.lookup = lookup
        self.denylist = denylist
        self._verified: dict[bytes, AccessToken] = {}
        self._cache_key = secrets.token_bytes(32)  # per process: the digests mean nothing elsewhere

    def verify(self, value: bytes | str) -> Grant | Awaitable[Grant]:
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
        key = hmac.digest(self._cache_key, raw, "sha256")
        token = self._verified.get(key)
        if token is None:
            token = self.keys.parse(value)
            if token is None:
                return INVALID_TOKEN
            if len(self._verified) >= _VERIFIED_CACHE_SIZE:
                self._verified.clear()
            self._verified[key] = token
        return self.check(token)

    def check(self, token: AccessToken) -> Grant | Awaitable[Grant]:
        """The decision for a token whose signature verified."""
        if token.expires_at <= time.time():
            return TOKEN_EXPIRED
        if not self.denylist.loaded:
            return self._after_denylist(token)
        if self.denylist.is_revoked(token):
            return INVALID_TOKEN
        found = self.lookup.record(token.public_id)
        if isinstance(found, CachedCredential):
            return decide(token, found)
        if isinstance(found, Negative):
            return INVALID_TOKEN
        return self._decide_later(token, found)

    async def _after_denylist(self, token: AccessToken) -> Grant:
        if self.denylist.load_failed:  # the store is down since this worker started: no waiting
            return Grant("unavailable", retry_after=UNAVAILABLE.retry_after)
        try:
            await asyncio.wait_for(self.denylist.wait_loaded(), _DENYLIST_WAIT)
        except TimeoutError:
            return Grant("unavailable", retry_after=UNAVAILABLE.retry_after)
        result = self.check(token)
        return result if isinstance(result, Grant) else await result

    async def _decide_later(self, token: AccessToken, pending: Awaitable[Found]) -> Grant:
        """The decision once Redis or the store has answered for the token's credential."""
        found = await pending
        if isinstance(found, CachedCredential):
            return decide(token, found)
        if isinstance(found, Verdict) and found.outcome == "unavailable":
            return Grant("unavailable", retry_after=found.retry_after)
        return INVALID_TOKEN


def decide(token: AccessToken, entry: CachedCredential) -> Grant:
    """A token is as good as its credential: same key pair, same current secret, and the credential's status."""
    if entry.kind != "key" or not hmac.compare_digest(entry.current_fp, token.fingerprint):
        return INVALID_TOKEN  # rotated (or not a key pair): tokens issued for the old secret are dead
    verdict = status_of(entry, time.time())
    if verdict is INVALID:
        return INVALID_TOKEN
    return Grant(verdict.outcome, entry, scope=token.scope & entry.groups, token=token)
