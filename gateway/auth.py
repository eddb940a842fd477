"""authenticate(presented) -> Verdict: memory, then Redis, then the store plus argon2id, then the decision.

The fast path (memory holds a verified digest) is synchronous: one HMAC and one dict lookup. Everything
else is a coroutine. A secret's status (expired, suspended) is only revealed after the secret verified;
unknown ids, wrong secrets and revoked credentials all read `invalid`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.cache import CachedCredential, MemoryCache, Negative, RedisTier, entry_from_redis
from gateway.core import hashing, store
from gateway.core.errors import STORE_ERRORS
from gateway.core.formats import Presented
from gateway.core.settings import Settings
from gateway.throttle import FailureThrottle

logger = logging.getLogger(__name__)




@dataclass(slots=True, frozen=True)
class Verdict:
    """ok | invalid | expired | suspended | throttled | unavailable (with the credential when it verified)."""

    outcome: str
    entry: CachedCredential | None = None
    retry_after: int = 0


INVALID = Verdict("invalid")
UNAVAILABLE = Verdict("unavailable", retry_after=5)
BUSY = Verdict("unavailable", retry_after=1)


def status_of(entry: CachedCredential, now: float) -> Verdict:
    """The decision for a credential whose secret verified."""
    if entry.revoked:
        return INVALID
    if entry.expires_at is not None and entry.expires_at <= now:
        return Verdict("expired", entry)
    if entry.owner_disabled:
        return Verdict("suspended", entry)
    verdict = entry.ok_verdict
    if verdict is None:  # built once per cache entry: the hot path allocates no Verdict
        verdict = entry.ok_verdict = Verdict("ok", entry)
    return verdict  # type: ignore[return-value]


class CacheObserver:
    """Hook for cache metrics: tier is memory|redis|store, result hit|miss|negative."""

    def lookup(self, tier: str, result: str) -> None:  # pragma: no cover - replaced by metrics
        pass


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        pool: store.Pool,
        memory: MemoryCache,
        redis_tier: RedisTier,
        argon2: hashing.Argon2Pool,
        throttle: FailureThrottle,
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        self.key = settings.secret_key_bytes
        self.pool = pool
        self.memory = memory
        self.redis = redis_tier
        self.argon2 = argon2
        self.throttle = throttle
        self.memory_ttl = settings.cache.memory_ttl
        # Set by the runtime: False while the invalidation channel (and so, usually, the store) is down.
        self.store_reachable: Callable[[], bool] = lambda: True
        self.stale_ttl = settings.cache.stale_ttl
        self.negative_ttl = settings.cache.negative_ttl
        self.observe = observe or (lambda tier, result: None)
        self._inflight: dict[tuple[str, bytes], asyncio.Future[Verdict]] = {}

    def check(self, presented: Presented, client_ip: str) -> Verdict | Awaitable[Verdict]:
        """The verdict now when memory knows the answer, else an awaitable that finds out."""
        digest = hashing.secret_digest(self.key, presented.kind, presented.public_id, presented.secret)
        entry = self.memory.get(presented.public_id)
        if entry is not None:
            fresh_until = entry.until if isinstance(entry, Negative) else entry.fetched + self.memory_ttl
            if time.monotonic() < fresh_until:
                if isinstance(entry, Negative):
                    self.observe("memory", "negative")
                    self.throttle.note_address_failure(client_ip)
                    return INVALID
                if entry.revoked:  # invalid whatever the secret: no verification needed
                    self.observe("memory", "hit")
                    return INVALID
                if entry.matches(digest, time.time()):
                    self.observe("memory", "hit")
                    return status_of(entry, time.time())
        self.observe("memory", "miss")
        return self._shared(presented, digest, client_ip)

    def _shared(self, presented: Presented, digest: bytes, client_ip: str) -> Awaitable[Verdict]:
        """Coalesce concurrent misses for the same secret in this process."""
        key = (presented.public_id, digest)
        pending = self._inflight.get(key)
        if pending is not None:
            return asyncio.shield(pending)
        task = asyncio.get_running_loop().create_task(self._slow(presented, digest, client_ip))
        self._inflight[key] = task
        task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return asyncio.shield(task)

    async def _slow(self, presented: Presented, digest: bytes, client_ip: str) -> Verdict:
        public_id = presented.public_id
        stale = self.memory.get(public_id)
        stale_entry = stale if isinstance(stale, CachedCredential) else None
        generation = self.memory.generation

        fields, negative = await self.redis.get(public_id)
        if negative:
            self.observe("redis", "negative")
            self.memory.put_negative(public_id, self.negative_ttl)
            self.throttle.note_address_failure(client_ip)
            return INVALID
        if fields is not None:
            cached = self._shared_entry(public_id, fields)
            if cached is not None and cached.revoked:
                self.observe("redis", "hit")
                self._remember(cached, None, generation)
                return INVALID
            if cached is not None and cached.matches(digest, time.time()) and self._usable(cached):
                self.observe("redis", "hit")
                self._remember(cached, stale_entry, generation)
                return status_of(cached, time.time())
        self.observe("redis", "miss")

        if self.throttle.blocked_address_locally(client_ip) is not None:
            return Verdict("throttled", retry_after=int(self.throttle.window))
        return await self._from_store(presented, digest, client_ip, stale_entry, generation)

    async def _from_store(
        self, presented: Presented, digest: bytes, client_ip: str, stale_entry: CachedCredential | None, generation: int
    ) -> Verdict:
        public_id = presented.public_id
        read_started = time.time()  # what the snapshot is at least as new as (see MemoryCache.outdated)
        try:
            record = await self._read_record(public_id)
        except STORE_ERRORS as exc:
            logger.warning("store unreachable for a credential lookup: %s", exc.__class__.__name__)
            if stale_entry is not None and stale_entry.matches(digest, time.time()) and self._recent(stale_entry):
                self.observe("memory", "hit")
                return status_of(stale_entry, time.time())
            return UNAVAILABLE
        if record is None:
            self.observe("store", "negative")
            if self.memory.generation == generation:
                self.memory.put_negative(public_id, self.negative_ttl)
                await self.redis.put_negative(public_id)
            self.throttle.note_address_failure(client_ip)
            return INVALID
        self.observe("store", "hit")
        entry = CachedCredential.from_record(record, time.monotonic())
        entry.stored_at = read_started
        if record.kind != presented.kind:
            return INVALID
        if entry.revoked:  # the answer is 401 whatever the secret: remember that, skip argon2
            self._remember(entry, None, generation)
            await self._publish(entry, None, "", generation)
            return INVALID
        for old in stale_entry.digests if stale_entry is not None else ():
            if old[1] in (entry.current_fp, entry.previous_fp):
                entry.add_digest(*old)
        if entry.matches(digest, time.time()):
            self._remember(entry, None, generation)
            await self._publish(entry, None, "", generation)
            return status_of(entry, time.time())
        return await self._verify(presented, digest, client_ip, entry, generation)

    async def _verify(
        self, presented: Presented, digest: bytes, client_ip: str, entry: CachedCredential, generation: int
    ) -> Verdict:
        """argon2id against the current (and, within grace, previous) hash; throttled and coalesced."""
        public_id = presented.public_id
        claimed = await self.redis.claim_verification(public_id, digest, 3000)
        # Claimed or not, look once more: another process may have finished (and released its claim)
        # between our Redis miss and now. Unclaimed, keep looking while the other process verifies.
        for attempt in range(1 if claimed else 60):
            if attempt:
                await asyncio.sleep(0.025)
            fields, _neg = await self.redis.get(public_id)
            shared = self._shared_entry(public_id, fields) if fields else None
            if shared is not None and shared.matches(digest, time.time()):
                self.observe("redis", "hit")
                self._remember(shared, entry, generation)
                if claimed:
                    await self.redis.release_verification(public_id, digest)
                return status_of(shared, time.time())
        try:
            retry_after = await self.throttle.reserve(public_id, client_ip)
            if retry_after is not None:
                return Verdict("throttled", retry_after=retry_after)
            candidates = [(entry.secret_hash, entry.current_fp)]
            if entry.previous_hash and time.time() < entry.previous_until:
                candidates.append((entry.previous_hash, entry.previous_fp))
            matched_fp = ""
            matched_hash = ""
            for stored_hash, fp in candidates:
                try:
                    if await self.argon2.verify(stored_hash, presented.secret):
                        matched_fp, matched_hash = fp, stored_hash
                        break
                except hashing.Argon2Busy:
                    return BUSY
            if not matched_fp:
                return INVALID
            await self.throttle.refund(public_id, client_ip)
            entry.add_digest(digest, matched_fp)
            self._remember(entry, None, generation)
            await self._publish(entry, digest, matched_fp, generation)
            if matched_fp == entry.current_fp and hashing.needs_rehash(self.argon2.hasher, matched_hash):
                await self._rehash(presented, matched_hash)
            return status_of(entry, time.time())
        finally:
            await self.redis.release_verification(public_id, digest)

    def _shared_entry(self, public_id: str, fields: dict[bytes, bytes]) -> CachedCredential | None:
        """The Redis tier's entry, unless it was read from the store before a change notification about it."""
        entry = entry_from_redis(public_id, fields, time.monotonic())
        return None if entry is None or self.memory.outdated(entry) else entry

    def _recent(self, entry: CachedCredential) -> bool:
        """Read from the store within stale_ttl: good enough while the store cannot be asked."""
        return time.time() - entry.stored_at < self.stale_ttl

    def _usable(self, entry: CachedCredential) -> bool:
        """A shared entry counts while the store is reachable, and only within stale_ttl while it is not."""
        return self.store_reachable() or self._recent(entry)

    async def _read_record(self, public_id: str) -> store.AuthRecord | None:
        """One store read (shorter wait for a connection while the invalidation channel is down)."""
        async with self.pool.acquire(timeout=2.0 if self.store_reachable() else 0.5) as conn:
            return await store.fetch_auth_record(conn, public_id)

    def _remember(self, entry: CachedCredential, previous: CachedCredential | None, generation: int) -> None:
        """Put into memory unless an invalidation arrived since the read began (it would be stale)."""
        if self.memory.generation != generation:
            return
        if previous is not None:  # digests verified here stay valid while their hash is unchanged
            for old in previous.digests:
                if old[1] in (entry.current_fp, entry.previous_fp):
                    entry.add_digest(*old)
        self.memory.put(entry)

    async def _publish(self, entry: CachedCredential, digest: bytes | None, fp: str, generation: int) -> None:
        if self.memory.generation == generation:
            await self.redis.put(entry, digest, fp)

    async def _rehash(self, presented: Presented, old_hash: str) -> None:
        """Stronger parameters configured: store a new hash (the change notification refreshes caches)."""
        try:
            new_hash = await self.argon2.hash(presented.secret)
            await self.pool.execute(store.UPDATE_SECRET_HASH, presented.public_id, new_hash, old_hash)
        except (hashing.Argon2Busy, *STORE_ERRORS):
            logger.info("rehash of credential %s postponed", presented.public_id)

    # --- a credential's record without a secret (OAuth access tokens, gateway.tokens) ---------------------

    async def load_entry(self, public_id: str) -> CachedCredential | Verdict:
        """The credential's record for a caller whose proof is a signed access token, not a secret.

        Redis, then the store, remembered in memory like any other read; nothing here verifies a secret or
        adds a digest. INVALID for an unknown id; UNAVAILABLE when no tier can answer (a stale entry still
        counts within stale_ttl of its last store read, as for secrets).
        """
        stale = self.memory.get(public_id)
        stale_entry = stale if isinstance(stale, CachedCredential) else None
        generation = self.memory.generation
        fields, negative = await self.redis.get(public_id)
        if negative:
            self.observe("redis", "negative")
            self.memory.put_negative(public_id, self.negative_ttl)
            return INVALID
        shared = self._shared_entry(public_id, fields) if fields is not None else None
        if shared is not None and self._usable(shared):
            self.observe("redis", "hit")
            self._remember(shared, stale_entry, generation)
            return shared
        self.observe("redis", "miss")
        read_started = time.time()  # what the snapshot is at least as new as (see MemoryCache.outdated)
        try:
            record = await self._read_record(public_id)
        except STORE_ERRORS as exc:
            logger.warning("store unreachable for a credential lookup: %s", exc.__class__.__name__)
            if stale_entry is not None and self._recent(stale_entry):
                return stale_entry
            return UNAVAILABLE
        if record is None:
            self.observe("store", "negative")
            if self.memory.generation == generation:
                self.memory.put_negative(public_id, self.negative_ttl)
                await self.redis.put_negative(public_id)
            return INVALID
        self.observe("store", "hit")
        entry = CachedCredential.from_record(record, time.monotonic())
        entry.stored_at = read_started
        self._remember(entry, stale_entry, generation)
        await self._publish(entry, None, "", generation)
        return entry
