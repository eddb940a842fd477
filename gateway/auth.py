"""Secret verification: check(presented) -> Verdict, from a remembered digest or argon2id, throttled and coalesced.

The fast path (memory holds a verified digest) is synchronous: one HMAC and one dict lookup. On a miss the
credential is looked up through the tiers (gateway.lookup); argon2id runs only when no tier remembers this
secret, after the failure throttle agrees, once per secret across processes (a short Redis claim). A
secret's status (expired, suspended) is only revealed after the secret verified; unknown ids, wrong secrets
and revoked credentials all read `invalid`.

An imported (legacy) key is first resolved to its public id (gateway.lookup, by a keyed digest or a client id;
unknown ones are remembered, cost no hash and read `invalid`), then checked like any other secret. Verifying
against a legacy hash (gateway.core.legacy) stands in for argon2 there; its first success replaces the legacy
hash with argon2id, once across replicas, and writes a `credential.migrate` audit event.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable

from gateway.core import database, hashing, legacy, store
from gateway.core.errors import STORE_ERRORS
from gateway.core.formats import CredentialKind, Presented, PresentedLegacy
from gateway.entry import BUSY, INVALID, CachedCredential, Negative, Verdict, status_of
from gateway.lookup import Coalescer, CredentialLookup, Walk
from gateway.throttle import FailureThrottle

logger = logging.getLogger(__name__)

# How long a process that did not win the verification claim keeps looking for the winner's result.
_CLAIM_MS = 3000
_CLAIM_POLLS = 60
_CLAIM_POLL_SECONDS = 0.025
# Who the audit trail names for a migration the gateway made on a key's first use.
_GATEWAY_ACTOR = store.Actor(label="gateway", source="gateway")


class Authenticator:
    """Verifies presented secrets against the credential store, remembering verified digests in both tiers."""

    def __init__(
        self,
        server_key: bytes,
        lookup: CredentialLookup,
        argon2: hashing.Argon2Pool,
        throttle: FailureThrottle,
    ) -> None:
        self.key = server_key
        self._digester = hashing.SecretDigester(server_key)
        self.lookup = lookup
        self.argon2 = argon2
        self.throttle = throttle
        self._verifications: Coalescer[tuple[str, bytes], Verdict] = Coalescer()
        # bcrypt and pbkdf2 run in threads, at most as many at once as argon2 does (made at first use)
        self._slow_legacy: asyncio.Semaphore | None = None

    def digest(self, presented: Presented) -> bytes:
        """The keyed digest this secret is remembered by (never the secret itself)."""
        return self._digester.digest(presented.kind, presented.public_id, presented.secret)

    def remembered(self, kind: CredentialKind, public: bytes, secret: bytes) -> Verdict | None:
        """The verdict when memory knows this secret verified (a fresh entry, not revoked, this digest), else None:
        then the full path (extract() and check()) runs, with every refusal, count and throttle. The shortcut of
        that path for its commonest request, fed by gateway.extract.shortcut: it skips the format and checksum
        tests (a secret whose keyed digest matches a verified one passed them when it was issued) and the
        Presented object: cached bearer 216,984 -> 198,767 instructions per request (tests/bench/instructions.py).
        tests/gateway/test_auth.py checks that it answers as the full path does."""
        entry = self.lookup.fresh(public.decode("latin-1"))  # never an id in memory unless ASCII
        if type(entry) is not CachedCredential or entry.revoked:
            return None
        now = time.time()
        if not entry.matches(self._digester.digest_bytes(kind, public, secret), now):
            return None
        self.lookup.observe("memory", "hit")
        return status_of(entry, now)

    def check(self, presented: Presented, client_ip: str) -> Verdict | Awaitable[Verdict]:
        """The verdict now when memory knows the answer, else an awaitable that finds out."""
        if isinstance(presented, PresentedLegacy):
            return self._check_legacy(presented, client_ip)
        digest = self.digest(presented)
        lookup = self.lookup
        entry = lookup.fresh(presented.public_id)
        if isinstance(entry, Negative):
            lookup.observe("memory", "negative")
            self.throttle.note_address_failure(client_ip)
            return INVALID
        if entry is not None:
            if entry.revoked:  # invalid whatever the secret: no verification needed
                lookup.observe("memory", "hit")
                return INVALID
            now = time.time()
            if entry.matches(digest, now):
                lookup.observe("memory", "hit")
                return status_of(entry, now)
        lookup.observe("memory", "miss")
        blocked = self.throttle.blocked_locally(presented.public_id, client_ip)
        if blocked is not None:  # past a limit in this process already: no Redis, no store, no argon2
            return Verdict("throttled", retry_after=max(1, math.ceil(blocked)))
        key = (presented.public_id, digest)
        return self._verifications.run(key, lambda: self._verify_through_tiers(presented, digest, client_ip))

    def _check_legacy(self, presented: PresentedLegacy, client_ip: str) -> Verdict | Awaitable[Verdict]:
        """Find the credential an imported key is filed under, then check it like any other."""
        if presented.kind == "key":
            key = legacy.client_lookup(presented.client_id)
            candidates = [key]
        else:
            key = legacy.token_lookup(self.key, presented.secret)
            candidates = [key, *legacy.unsalted_lookups(presented.secret)]
        filed = self.lookup.legacy.get(key)
        if filed is not None:
            return self._check_filed(filed, presented, client_ip)
        if self.throttle.blocked_address_locally(client_ip) is not None:  # before any store read, as for ids
            return Verdict("throttled", retry_after=int(self.throttle.window))
        return self._check_when_filed(self.lookup.filed_under(key, candidates), presented, client_ip)

    async def _check_when_filed(
        self, filed: Awaitable[str | Negative | Verdict], presented: PresentedLegacy, client_ip: str
    ) -> Verdict:
        verdict = self._check_filed(await filed, presented, client_ip)
        return verdict if isinstance(verdict, Verdict) else await verdict

    def _check_filed(
        self, filed: str | Negative | Verdict, presented: PresentedLegacy, client_ip: str
    ) -> Verdict | Awaitable[Verdict]:
        if isinstance(filed, Verdict):
            return filed
        if isinstance(filed, Negative):  # like an unknown id: no hash, and it counts against the address
            self.throttle.note_address_failure(client_ip)
            return INVALID
        return self.check(Presented(presented.kind, filed, presented.secret), client_ip)

    async def _verify_through_tiers(self, presented: Presented, digest: bytes, client_ip: str) -> Verdict:
        lookup = self.lookup
        walk = lookup.begin(presented.public_id)
        shared = await lookup.from_redis(walk, digest)
        if shared is not None:
            return self._remembered(shared, client_ip)
        if self.throttle.blocked_address_locally(client_ip) is not None:
            return Verdict("throttled", retry_after=int(self.throttle.window))
        stored = await lookup.from_store(walk, digest)
        if not isinstance(stored, CachedCredential) or stored is walk.stale:
            return self._remembered(stored, client_ip)
        if stored.kind != presented.kind:
            return INVALID
        if stored.revoked:  # the answer is 401 whatever the secret: remember that, skip argon2
            lookup.remember(walk, stored, keep_stale_digests=False)
            await lookup.publish(walk, stored)
            return INVALID
        lookup.carry_digests(walk, stored)
        if stored.matches(digest, time.time()):
            lookup.remember(walk, stored, keep_stale_digests=False)
            await lookup.publish(walk, stored)
            return status_of(stored, time.time())
        return await self._verify(presented, digest, client_ip, walk, stored)

    def _remembered(self, found: CachedCredential | Negative | Verdict, client_ip: str) -> Verdict:
        """The verdict for what a tier answered without argon2: an entry that knows this secret, or no entry."""
        if isinstance(found, Verdict):
            return found
        if isinstance(found, Negative):
            self.throttle.note_address_failure(client_ip)
            return INVALID
        return status_of(found, time.time())

    async def _verify(
        self, presented: Presented, digest: bytes, client_ip: str, walk: Walk, entry: CachedCredential
    ) -> Verdict:
        """argon2id against the current (and, within grace, previous) hash; throttled and claimed across processes."""
        lookup = self.lookup
        public_id = presented.public_id
        claimed = await lookup.redis.claim_verification(public_id, digest, _CLAIM_MS)
        # Claimed or not, look once more: another process may have finished (and released its claim)
        # between our Redis miss and now. Unclaimed, keep looking while the other process verifies.
        for attempt in range(1 if claimed else _CLAIM_POLLS):
            if attempt:
                await asyncio.sleep(_CLAIM_POLL_SECONDS)
            fields, _negative = await lookup.redis.get(public_id)
            shared = lookup.shared_entry(public_id, fields) if fields else None
            if shared is not None and shared.matches(digest, time.time()):
                lookup.observe("redis", "hit")
                walk.stale = entry  # keep the digests verified here
                lookup.remember(walk, shared)
                if claimed:
                    await lookup.redis.release_verification(public_id, digest)
                return status_of(shared, time.time())
        try:
            retry_after = await self.throttle.reserve(public_id, client_ip)
            if retry_after is not None:
                return Verdict("throttled", retry_after=retry_after)
            try:
                matched_fp, matched_hash = await self._argon2(entry, presented.secret)
            except hashing.Argon2Busy:
                await self.throttle.refund(public_id, client_ip)  # not a failure: nothing was verified
                return BUSY
            if not matched_fp:
                return INVALID
            await self.throttle.refund(public_id, client_ip)
            entry.add_digest(digest, matched_fp)
            lookup.remember(walk, entry, keep_stale_digests=False)
            await lookup.publish(walk, entry, digest, matched_fp)
            if matched_fp == entry.current_fp and legacy.is_legacy_hash(matched_hash):
                await self._migrate(presented, matched_hash)
            elif matched_fp == entry.current_fp and hashing.needs_rehash(self.argon2.hasher, matched_hash):
                await self._rehash(presented, matched_hash)
            return status_of(entry, time.time())
        finally:
            await lookup.redis.release_verification(public_id, digest)

    async def _argon2(self, entry: CachedCredential, secret: str) -> tuple[str, str]:
        """(fingerprint, hash) of the accepted hash the secret matches, ("", "") for none."""
        candidates = [(entry.secret_hash, entry.current_fp)]
        if entry.previous_hash and time.time() < entry.previous_until:
            candidates.append((entry.previous_hash, entry.previous_fp))
        for stored_hash, fp in candidates:
            if await self._matches(stored_hash, secret):
                return fp, stored_hash
        return "", ""

    async def _matches(self, stored_hash: str, secret: str) -> bool:
        """argon2id, or the legacy scheme of a key imported as a hash and not used since (constant time)."""
        if not legacy.is_legacy_hash(stored_hash):
            return await self.argon2.verify(stored_hash, secret)
        if not legacy.is_slow(stored_hash):
            return legacy.verify(stored_hash, secret)
        if self._slow_legacy is None:
            self._slow_legacy = asyncio.Semaphore(self.argon2.concurrency)
        async with self._slow_legacy:
            return await asyncio.to_thread(legacy.verify, stored_hash, secret)

    async def _migrate(self, presented: Presented, old_hash: str) -> None:
        """First use of a key imported as a legacy hash: argon2id replaces it (and a token's unsalted index).

        The UPDATE is guarded by the old hash, so across replicas one wins and writes the audit event; the
        change notification refreshes every cache. Postponed (not lost) when argon2 or the store is busy.
        """
        public_id = presented.public_id
        try:
            new_hash = await self.argon2.hash(presented.secret)
            async with database.within(self.lookup.pool, self.lookup.store_timeout) as conn, conn.transaction():
                credential_id = await conn.fetchval(legacy.MIGRATE_SECRET, public_id, new_hash, old_hash)
                if credential_id is None:
                    return  # migrated already (another replica), rotated or gone
                if presented.kind == "token":
                    await conn.execute(legacy.REINDEX_TOKEN, credential_id,
                                       legacy.token_lookup(self.key, presented.secret))
                await store.write_audit(conn, _GATEWAY_ACTOR, "credential.migrate", "credential", public_id,
                                        {"from": legacy.scheme_of(old_hash), "to": "argon2id"})
            logger.info("credential %s migrated from a legacy hash to argon2id", public_id)
        except (hashing.Argon2Busy, *STORE_ERRORS):
            logger.info("migration of credential %s postponed", public_id)

    async def _rehash(self, presented: Presented, old_hash: str) -> None:
        """Stronger parameters configured: store a new hash (the change notification refreshes caches)."""
        try:
            new_hash = await self.argon2.hash(presented.secret)
            async with database.within(self.lookup.pool, self.lookup.store_timeout) as conn:
                await conn.execute(store.UPDATE_SECRET_HASH, presented.public_id, new_hash, old_hash)
        except (hashing.Argon2Busy, *STORE_ERRORS):
            logger.info("rehash of credential %s postponed", presented.public_id)
