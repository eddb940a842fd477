"""One read-through credential lookup: process memory, then Redis, then the store.

Used by secret verification (gateway.auth), the OAuth access-token verifier and the OAuth endpoints. An
imported (legacy) key is first resolved to its public id through the legacy lookup (`LegacyIndex`, then
the store), then looked up like any other credential. The
walk for one credential is a `Walk`: it remembers what memory held when it began (a fallback while the
store is away, and digests worth keeping) and the memory generation, so that nothing read before an
invalidation is ever cached after it. Entries read from the store are published to Redis, so that one
store read (and one argon2 run) serves every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from gateway.core import database, legacy, store
from gateway.core.errors import STORE_ERRORS
from gateway.core.settings import CacheSettings
from gateway.entry import UNAVAILABLE, CachedCredential, Negative, Verdict
from gateway.memory import MemoryCache
from gateway.redis_tier import RedisTier

logger = logging.getLogger(__name__)

Tier = Literal["memory", "redis", "store"]
LookupResult = Literal["hit", "miss", "negative"]
Observe = Callable[[Tier, LookupResult], None]

_Key = TypeVar("_Key", bound=Hashable)
_Value = TypeVar("_Value")


class Coalescer(Generic[_Key, _Value]):
    """Concurrent callers asking the same question in this process share one answer (one walk, one argon2)."""

    def __init__(self) -> None:
        self._inflight: dict[_Key, asyncio.Future[_Value]] = {}

    def run(self, key: _Key, start: Callable[[], Awaitable[_Value]]) -> Awaitable[_Value]:
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(start())
            self._inflight[key] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(key, None))
        # shield: one caller giving up (client gone) must not cancel the others' answer
        return asyncio.shield(pending)


@dataclass(slots=True)
class Walk:
    """One read-through lookup of one credential, from the moment memory could not answer."""

    public_id: str
    generation: int  # memory's generation when the walk began: an eviction since then forbids caching
    stale: CachedCredential | None  # what memory held (not fresh): digests to keep, a fallback while the store is away


# How long a failed store read makes the store count as down for this process before one read probes it.
_DOWN_SECONDS = 1.0
# The deadline of a store read while the invalidation channel is down (the store is probably down too).
_DEADLINE_WHILE_DOWN = 0.5


class StoreDown(ConnectionError):
    """The store failed moments ago: not asked again yet (one of STORE_ERRORS, via OSError)."""


class StoreHealth:
    """Marks the store down for this process at the first failed read, so a hung store costs one deadline.

    While down, reads fail at once with StoreDown; after `_DOWN_SECONDS` one read at a time probes the store,
    and its success ends the outage for everyone.
    """

    def __init__(self) -> None:
        self.down_until = 0.0
        self.probing = False

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        now = time.monotonic()
        if self.down_until:
            if now < self.down_until or self.probing:
                raise StoreDown("the credential store failed moments ago")
            self.probing = True
        try:
            yield
        except STORE_ERRORS:
            self.down_until = time.monotonic() + _DOWN_SECONDS
            raise
        else:
            self.down_until = 0.0
        finally:
            self.probing = False


# The store does not know the id (remembered briefly in both tiers).
UNKNOWN: Negative = Negative(until=float("inf"))


class LegacyIndex:
    """Process memory of which public id a presented legacy key is filed under (or that none is).

    Keys are lookup keys (gateway.core.legacy: the keyed digest of a token, or `k:` + a client id), never a
    secret. A mapping never changes while its credential exists, so a positive entry past its TTL still
    serves while the store is away; a negative one lasts `cache.negative_ttl`.
    """

    def __init__(self, max_entries: int, ttl: float, negative_ttl: float) -> None:
        self.entries: dict[str, tuple[str, float]] = {}  # lookup key -> (public id, or "" for none; until)
        self.max_entries = max_entries
        self.ttl = ttl
        self.negative_ttl = negative_ttl

    def get(self, key: str, *, stale_ok: bool = False) -> str | Negative | None:
        found = self.entries.get(key)
        if found is None:
            return None
        public_id, until = found
        if time.monotonic() >= until and not (stale_ok and public_id):
            return None
        return public_id or UNKNOWN

    def put(self, key: str, public_id: str) -> None:
        self.entries.pop(key, None)
        self.entries[key] = (public_id, time.monotonic() + (self.ttl if public_id else self.negative_ttl))
        while len(self.entries) > self.max_entries:
            del self.entries[next(iter(self.entries))]


class CredentialLookup:
    """memory -> Redis -> store for credentials, with negative entries, stale fallback and publishing to Redis."""

    def __init__(
        self,
        cache: CacheSettings,
        pool: store.Pool,
        memory: MemoryCache,
        redis_tier: RedisTier,
        *,
        observe: Observe = lambda _tier, _result: None,
        store_reachable: Callable[[], bool] = lambda: True,
    ) -> None:
        self.pool = pool
        self.memory = memory
        self.redis = redis_tier
        self.observe = observe
        # False while the invalidation channel (and so, usually, the store) is down.
        self.store_reachable = store_reachable
        self.health = StoreHealth()
        self.store_timeout = cache.store_timeout
        self.memory_ttl = cache.memory_ttl
        self.stale_ttl = cache.stale_ttl
        self.negative_ttl = cache.negative_ttl
        self._records: Coalescer[str, CachedCredential | Negative | Verdict] = Coalescer()
        self.legacy = LegacyIndex(memory.max_entries, cache.memory_ttl, cache.negative_ttl)
        self._legacy: Coalescer[str, str | Negative | Verdict] = Coalescer()

    # --- memory ---------------------------------------------------------------------------------------------

    def fresh(self, public_id: str) -> CachedCredential | Negative | None:
        """Memory's entry while it is fresh (within memory_ttl of its last confirmation), else None. No I/O."""
        entry = self.memory.get(public_id)
        if entry is None:
            return None
        fresh_until = entry.until if isinstance(entry, Negative) else entry.fetched + self.memory_ttl
        return entry if time.monotonic() < fresh_until else None

    def begin(self, public_id: str) -> Walk:
        stale = self.memory.get(public_id)
        return Walk(public_id, self.memory.generation, stale if isinstance(stale, CachedCredential) else None)

    # --- Redis ----------------------------------------------------------------------------------------------

    async def from_redis(self, walk: Walk, digest: bytes | None) -> CachedCredential | Negative | None:
        """The shared tier's answer: UNKNOWN, a revoked entry, or an entry that knows `digest` (any entry when
        `digest` is None) and may be used now; None when Redis cannot answer for this secret."""
        public_id = walk.public_id
        fields, negative = await self.redis.get(public_id)
        if negative:
            self.observe("redis", "negative")
            self.memory.put_negative(public_id, self.negative_ttl)
            return UNKNOWN
        shared = self.shared_entry(public_id, fields) if fields is not None else None
        if shared is not None and (
            shared.revoked or ((digest is None or shared.matches(digest, time.time())) and self._usable(shared))
        ):
            self.observe("redis", "hit")
            self.remember(walk, shared, keep_stale_digests=not shared.revoked)
            return shared
        self.observe("redis", "miss")
        return None

    def shared_entry(self, public_id: str, fields: dict[bytes, bytes]) -> CachedCredential | None:
        """The Redis tier's entry, unless it was read from the store before a change notification about it."""
        entry = CachedCredential.from_redis_fields(public_id, fields, time.monotonic())
        return None if entry is None or self.memory.outdated(entry) else entry

    # --- the store ------------------------------------------------------------------------------------------

    async def from_store(self, walk: Walk, digest: bytes | None) -> CachedCredential | Negative | Verdict:
        """The store's record (with the hashes, kept in memory only), UNKNOWN, or UNAVAILABLE.

        The read has a deadline (`cache.store_timeout`); when it fails, the store counts as down for this
        process for a second (later reads answer at once, then one read at a time probes it). While the store
        cannot answer, the entry memory held still counts within stale_ttl of its last store read, if it knows
        `digest` (or `digest` is None). The record is neither remembered nor published here: the caller decides
        when it has earned that (see `remember` and `publish`).
        """
        public_id = walk.public_id
        read_started = time.time()  # for stale_ttl; the change sequence read with the record decides staleness
        try:
            record = await self._read_record(public_id)
        except STORE_ERRORS as exc:
            if not isinstance(exc, StoreDown):
                logger.warning("store unreachable for a credential lookup: %s", exc.__class__.__name__)
            stale = walk.stale
            if stale is not None and self._recent(stale) and (digest is None or stale.matches(digest, time.time())):
                self.observe("memory", "hit")
                return stale
            return UNAVAILABLE
        if record is None:
            self.observe("store", "negative")
            if self.memory.generation == walk.generation:
                self.memory.put_negative(public_id, self.negative_ttl)
                await self.redis.put_negative(public_id)
            return UNKNOWN
        self.observe("store", "hit")
        entry = CachedCredential.from_record(record, time.monotonic())
        entry.stored_at = read_started
        return entry

    async def _read_record(self, public_id: str) -> store.AuthRecord | None:
        """One store read within the deadline (a shorter one while the invalidation channel is down)."""
        deadline = self.store_timeout if self.store_reachable() else min(self.store_timeout, _DEADLINE_WHILE_DOWN)
        with self.health.attempt():
            async with database.within(self.pool, deadline) as conn:
                return await store.fetch_auth_record(conn, public_id)

    # --- remembering ----------------------------------------------------------------------------------------

    def remember(self, walk: Walk, entry: CachedCredential, *, keep_stale_digests: bool = True) -> None:
        """Put into memory unless an invalidation arrived since the walk began (the entry would be stale)."""
        if self.memory.generation != walk.generation:
            return
        if keep_stale_digests:
            self.carry_digests(walk, entry)
        self.memory.put(entry)

    @staticmethod
    def carry_digests(walk: Walk, entry: CachedCredential) -> None:
        """Digests verified against a hash the new entry still accepts stay valid: no argon2 to re-learn them."""
        for old in walk.stale.digests if walk.stale is not None else ():
            if old[1] in (entry.current_fp, entry.previous_fp):
                entry.add_digest(*old)

    async def publish(self, walk: Walk, entry: CachedCredential, digest: bytes | None = None, fp: str = "") -> None:
        """Share the entry (and a newly verified digest) through Redis, under the same rule as `remember`."""
        if self.memory.generation == walk.generation:
            await self.redis.put(entry, digest, fp)

    # --- a record without a secret --------------------------------------------------------------------------

    def record(self, public_id: str) -> CachedCredential | Negative | Awaitable[CachedCredential | Negative | Verdict]:
        """The credential's record for a caller whose proof is not a secret (a signed access token).

        Now when memory knows it; else an awaitable (concurrent loads of one id coalesced) giving the entry,
        UNKNOWN, or UNAVAILABLE. Nothing here verifies a secret or adds a digest.
        """
        entry = self.fresh(public_id)
        if entry is not None:
            self.observe("memory", "negative" if isinstance(entry, Negative) else "hit")
            return entry
        self.observe("memory", "miss")
        return self._records.run(public_id, lambda: self._load(public_id))

    async def _load(self, public_id: str) -> CachedCredential | Negative | Verdict:
        walk = self.begin(public_id)
        found = await self.from_redis(walk, None)
        if found is not None:
            return found
        stored = await self.from_store(walk, None)
        if isinstance(stored, CachedCredential) and stored is not walk.stale:
            self.remember(walk, stored)
            await self.publish(walk, stored)
        return stored

    # --- imported (legacy) keys ----------------------------------------------------------------------------

    def filed_under(self, key: str, candidates: list[str]) -> Awaitable[str | Negative | Verdict]:
        """The public id a legacy key is filed under (any of `candidates`, `key` first), UNKNOWN, or UNAVAILABLE.

        For a key `self.legacy` (memory) does not know: concurrent loads are coalesced into one indexed store read
        with the same deadline and health as a credential read, remembered in memory. No hash is computed here.
        """
        return self._legacy.run(key, lambda: self._load_filed(key, candidates))

    async def _load_filed(self, key: str, candidates: list[str]) -> str | Negative | Verdict:
        deadline = self.store_timeout if self.store_reachable() else min(self.store_timeout, _DEADLINE_WHILE_DOWN)
        try:
            with self.health.attempt():
                async with database.within(self.pool, deadline) as conn:
                    row = await conn.fetchrow(legacy.RESOLVE, candidates)
        except STORE_ERRORS as exc:
            if not isinstance(exc, StoreDown):
                logger.warning("store unreachable for a legacy key lookup: %s", exc.__class__.__name__)
            stale = self.legacy.get(key, stale_ok=True)
            return stale if isinstance(stale, str) else UNAVAILABLE
        public_id: str = "" if row is None else row["public_id"]
        self.legacy.put(key, public_id)
        return public_id or UNKNOWN

    # --- staleness ------------------------------------------------------------------------------------------

    def _recent(self, entry: CachedCredential) -> bool:
        """Read from the store within stale_ttl: good enough while the store cannot be asked."""
        return time.time() - entry.stored_at < self.stale_ttl

    def _usable(self, entry: CachedCredential) -> bool:
        """A shared entry counts while the store is reachable, and only within stale_ttl while it is not."""
        return self.store_reachable() or self._recent(entry)
