"""The two cache tiers (process memory, Redis) for verified credentials, their keys, and the invalidation listener.

A credential is remembered with the keyed digests (HMAC under the server key) of the secrets that passed
argon2id, each tied to a fingerprint of the hash it was verified against: when the stored hash changes
(rotation), old digests stop matching without any coordination. Neither tier ever holds a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from gateway.core import store
from gateway.core.store import AuthRecord

logger = logging.getLogger(__name__)

# Redis keys: one home. A hash per credential: field "r" is the record, "d:<digest hex>" a verified digest.
REDIS_PREFIX = "credgate:"


def credential_key(public_id: str) -> str:
    return f"{REDIS_PREFIX}cred:{public_id}"


def negative_key(public_id: str) -> str:
    return f"{REDIS_PREFIX}unknown:{public_id}"


def verifying_key(public_id: str, digest: bytes) -> str:
    return f"{REDIS_PREFIX}verifying:{public_id}:{digest.hex()[:32]}"


def fingerprint(secret_hash: str | None) -> str:
    """Short digest of a stored hash: identifies which secret a remembered verification belongs to."""
    if not secret_hash:
        return ""
    return hashlib.sha256(secret_hash.encode()).hexdigest()[:16]


@dataclass(slots=True)
class CachedCredential:
    """What a process knows about one credential; built from the store or from Redis."""

    public_id: str
    credential_id: int
    kind: str
    name: str
    owner_id: int
    owner_name: str
    owner_disabled: bool
    revoked: bool
    expires_at: float | None  # epoch seconds
    creator: str
    groups: frozenset[str]
    current_fp: str
    previous_fp: str
    previous_until: float  # epoch seconds; the previous secret works until then
    fetched: float  # time.monotonic() when confirmed against Redis or the store; -inf once marked stale
    stored_at: float  # epoch seconds of the last read from the store (travels through Redis)
    digests: list[tuple[bytes, str]] = field(default_factory=list)  # (digest, fingerprint of hash verified)
    # Hashes kept in process memory only (never in Redis), so a new secret needs no extra query.
    secret_hash: str = ""
    previous_hash: str = ""
    header_blocks: dict[bytes, bytes] = field(default_factory=dict)  # per auth method, prebuilt
    ok_verdict: object | None = None  # gateway.auth's Verdict("ok", self), built once

    def __repr__(self) -> str:
        return f"CachedCredential(public_id={self.public_id!r}, owner={self.owner_name!r})"

    def matches(self, digest: bytes, now: float) -> bool:
        """Whether this secret digest was verified against a hash that is still accepted (constant time)."""
        found = False
        for known, fp in self.digests:
            if hmac.compare_digest(known, digest) and (
                fp == self.current_fp or (fp == self.previous_fp and now < self.previous_until)
            ):
                found = True
        return found

    def add_digest(self, digest: bytes, fp: str) -> None:
        if not any(hmac.compare_digest(d, digest) and f == fp for d, f in self.digests):
            # keep the list tiny: only digests for hashes still accepted
            self.digests = [(d, f) for d, f in self.digests if f in (self.current_fp, self.previous_fp)]
            self.digests.append((digest, fp))

    @classmethod
    def from_record(cls, rec: AuthRecord, fetched: float) -> CachedCredential:
        prev_until = (
            rec.previous_expires_at.timestamp() if rec.previous_expires_at and rec.previous_secret_hash else 0.0
        )
        return cls(
            public_id=rec.public_id,
            credential_id=rec.id,
            kind=rec.kind,
            name=rec.name,
            owner_id=rec.owner_id,
            owner_name=rec.owner_name,
            owner_disabled=rec.owner_disabled,
            revoked=rec.revoked_at is not None,
            expires_at=rec.expires_at.timestamp() if rec.expires_at else None,
            creator=rec.creator,
            groups=frozenset(rec.groups),
            current_fp=fingerprint(rec.secret_hash),
            previous_fp=fingerprint(rec.previous_secret_hash) if prev_until else "",
            previous_until=prev_until,
            fetched=fetched,
            stored_at=time.time(),
            secret_hash=rec.secret_hash,
            previous_hash=rec.previous_secret_hash or "",
        )

    def to_redis(self) -> str:
        return json.dumps(
            {
                "cid": self.credential_id,
                "k": self.kind,
                "n": self.name,
                "oid": self.owner_id,
                "o": self.owner_name,
                "od": self.owner_disabled,
                "rv": self.revoked,
                "x": self.expires_at,
                "c": self.creator,
                "g": sorted(self.groups),
                "fp": self.current_fp,
                "pfp": self.previous_fp,
                "pu": self.previous_until,
                "sa": self.stored_at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_redis(cls, public_id: str, raw: bytes, fetched: float) -> CachedCredential:
        d = json.loads(raw)
        return cls(
            public_id=public_id,
            credential_id=int(d["cid"]),
            kind=d["k"],
            name=d["n"],
            owner_id=int(d["oid"]),
            owner_name=d["o"],
            owner_disabled=bool(d["od"]),
            revoked=bool(d["rv"]),
            expires_at=d["x"],
            creator=d["c"],
            groups=frozenset(d["g"]),
            current_fp=d["fp"],
            previous_fp=d["pfp"],
            previous_until=float(d["pu"]),
            fetched=fetched,
            stored_at=float(d["sa"]),
        )


@dataclass(slots=True)
class Negative:
    """An id the store does not know, remembered briefly so floods of it cost no I/O."""

    until: float  # time.monotonic()


class MemoryCache:
    """Process-local tier: public id -> CachedCredential (or Negative), with an owner index for evictions."""

    def __init__(self, max_entries: int) -> None:
        self.entries: dict[str, CachedCredential | Negative] = {}
        self.by_owner: dict[int, set[str]] = {}
        self.max_entries = max_entries
        # Bumped on every eviction; a store read that started before a bump must not be cached.
        self.generation = 0
        # When a change notification last arrived, per credential, per owner and for everything (epoch
        # seconds): a shared entry read from the store before that moment is stale and never used again.
        self.credential_changed: dict[str, float] = {}
        self.owner_changed: dict[int, float] = {}
        self.all_changed = 0.0

    def get(self, public_id: str) -> CachedCredential | Negative | None:
        return self.entries.get(public_id)

    def put(self, entry: CachedCredential) -> None:
        old = self.entries.get(entry.public_id)
        if isinstance(old, CachedCredential) and old.owner_id != entry.owner_id:
            self._unindex(old)
        self.entries[entry.public_id] = entry
        self.by_owner.setdefault(entry.owner_id, set()).add(entry.public_id)
        self._bound()

    def put_negative(self, public_id: str, ttl: float) -> None:
        self.entries[public_id] = Negative(time.monotonic() + ttl)
        self._bound()

    def _bound(self) -> None:
        while len(self.entries) > self.max_entries:
            oldest = next(iter(self.entries))
            self.evict(oldest)

    def _unindex(self, entry: CachedCredential) -> None:
        ids = self.by_owner.get(entry.owner_id)
        if ids is not None:
            ids.discard(entry.public_id)
            if not ids:
                del self.by_owner[entry.owner_id]

    def evict(self, public_id: str) -> None:
        self.generation += 1
        entry = self.entries.pop(public_id, None)
        if isinstance(entry, CachedCredential):
            self._unindex(entry)

    def changed(self, public_id: str | None = None, owner_id: int | None = None) -> None:
        """Record a change notification (see `outdated`), keeping the records bounded."""
        now = time.time()
        if public_id is not None:
            if len(self.credential_changed) > 100_000:
                self.credential_changed.clear()
                self.all_changed = now
            self.credential_changed[public_id] = now
        if owner_id is not None:
            if len(self.owner_changed) > 100_000:
                self.owner_changed.clear()
                self.all_changed = now
            self.owner_changed[owner_id] = now
        if public_id is None and owner_id is None:
            self.all_changed = now

    def outdated(self, entry: CachedCredential) -> bool:
        """Whether the entry was read from the store before a change notification that concerns it."""
        read = entry.stored_at
        return (read <= self.all_changed or read <= self.credential_changed.get(entry.public_id, 0.0)
                or read <= self.owner_changed.get(entry.owner_id, 0.0))

    def evict_owner(self, owner_id: int) -> list[str]:
        ids = list(self.by_owner.get(owner_id, ()))
        for public_id in ids:
            self.evict(public_id)
        return ids

    def mark_all_stale(self) -> None:
        """Nothing may be served as fresh any more; entries stay only as a fallback during a store outage."""
        self.generation += 1
        for entry in self.entries.values():
            if isinstance(entry, CachedCredential):
                entry.fetched = -math.inf

    def __len__(self) -> int:
        return len(self.entries)


class RedisTier:
    """The shared tier. Every call degrades to 'no answer' when Redis is unreachable; `up` tells which."""

    def __init__(self, url: str, ttl: float, negative_ttl: float) -> None:
        self.client: aioredis.Redis | None = (
            aioredis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=0)
            if url
            else None
        )
        self.ttl_ms = int(ttl * 1000)
        self.negative_ms = max(1, int(negative_ttl * 1000))
        self.up = self.client is not None
        self._retry_at = 0.0
        self.on_state: Callable[[bool], None] | None = None

    def _available(self) -> bool:
        if self.client is None:
            return False
        return self.up or time.monotonic() >= self._retry_at

    def _failed(self, exc: BaseException) -> None:
        if self.up:
            logger.warning("redis unavailable (%s); continuing with memory and the store", exc.__class__.__name__)
        self.up = False
        self._retry_at = time.monotonic() + 1.0  # probe again at most once a second
        if self.on_state:
            self.on_state(False)

    def _ok(self) -> None:
        if not self.up:
            logger.info("redis is back")
            self.up = True
            if self.on_state:
                self.on_state(True)

    async def get(self, public_id: str) -> tuple[dict[bytes, bytes] | None, bool]:
        """(credential hash fields or None, known-unknown flag). (None, False) also when Redis is down."""
        if not self._available():
            return None, False
        assert self.client is not None
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(credential_key(public_id))
                pipe.exists(negative_key(public_id))
                fields, negative = await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)
            return None, False
        self._ok()
        return (fields or None), bool(negative)

    async def put(self, entry: CachedCredential, digest: bytes | None, fp: str) -> None:
        if not self._available():
            return
        assert self.client is not None
        key = credential_key(entry.public_id)
        mapping: dict[FieldT, EncodableT] = {"r": entry.to_redis()}
        if digest is not None:
            mapping["d:" + digest.hex()] = fp
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=mapping)
                pipe.pexpire(key, self.ttl_ms)
                await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)
            return
        self._ok()

    async def put_negative(self, public_id: str) -> None:
        if not self._available():
            return
        assert self.client is not None
        try:
            await self.client.set(negative_key(public_id), b"1", px=self.negative_ms)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)
            return
        self._ok()

    async def delete(self, public_ids: list[str]) -> None:
        if not public_ids or not self._available():
            return
        assert self.client is not None
        keys = [credential_key(p) for p in public_ids] + [negative_key(p) for p in public_ids]
        try:
            await self.client.delete(*keys)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)
            return
        self._ok()

    async def flush_all(self) -> None:
        """Drop every credgate cache entry (a group rename changes many identities at once)."""
        if not self._available():
            return
        assert self.client is not None
        try:
            async for key in self.client.scan_iter(match=REDIS_PREFIX + "cred:*", count=1000):
                await self.client.delete(key)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)

    async def claim_verification(self, public_id: str, digest: bytes, ms: int) -> bool:
        """True when this process should run argon2 for this secret; False when another already is."""
        if not self._available():
            return True
        assert self.client is not None
        try:
            claimed = await self.client.set(verifying_key(public_id, digest), b"1", nx=True, px=ms)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)
            return True
        return bool(claimed)

    async def release_verification(self, public_id: str, digest: bytes) -> None:
        if self.client is None or not self.up:
            return
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            await self.client.delete(verifying_key(public_id, digest))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def entry_from_redis(public_id: str, fields: dict[bytes, bytes], fetched: float) -> CachedCredential | None:
    raw = fields.get(b"r")
    if raw is None:
        return None
    try:
        entry = CachedCredential.from_redis(public_id, raw, fetched)
    except (ValueError, KeyError, TypeError):
        logger.warning("ignoring a malformed Redis cache entry for credential %s", public_id)
        return None
    for name, fp in fields.items():
        if name.startswith(b"d:"):
            with contextlib.suppress(ValueError):
                entry.digests.append((bytes.fromhex(name[2:].decode()), fp.decode()))
    return entry


class InvalidationListener:
    """LISTENs for the store's change notifications and evicts affected entries from both tiers.

    A lost connection marks the whole memory tier stale (re-checked before use) and reconnects with
    exponential backoff; TTLs bound staleness whatever happens.
    """

    def __init__(self, dsn: str, memory: MemoryCache, redis_tier: RedisTier, pool: store.Pool) -> None:
        self.dsn = dsn
        self.memory = memory
        self.redis = redis_tier
        self.pool = pool
        self.connected = False
        self.on_event: Callable[[float], None] | None = None  # called with the lag (seconds) of each event
        self.on_state: Callable[[bool], None] | None = None
        # "t": "j" events (an OAuth access token revoked; migration 003) go to the token denylist.
        self.on_token_revoked: Callable[[dict[str, Any]], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._pending):
            task.cancel()

    def _set_state(self, connected: bool) -> None:
        self.connected = connected
        if self.on_state:
            self.on_state(connected)

    async def _run(self) -> None:
        delay = 0.1
        first = True
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=5, server_settings={"application_name": "credgate-listen"}
                )
                self._lost.clear()
                conn.add_termination_listener(lambda _c: self._lost.set())
                await conn.add_listener(store.NOTIFY_CHANNEL, self._notified)
                if not first:  # anything may have changed while we were not listening
                    self.memory.mark_all_stale()
                first = False
                self._set_state(True)
                delay = 0.1
                while not self._lost.is_set():
                    try:
                        await asyncio.wait_for(self._lost.wait(), timeout=5.0)
                    except TimeoutError:
                        # a silently dead TCP connection never terminates: probe it
                        await asyncio.wait_for(conn.execute("SELECT 1"), timeout=3.0)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.debug("listen connection problem: %s", exc.__class__.__name__)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if self.connected:
                logger.warning("lost the invalidation channel; cache marked stale, reconnecting")
            self.memory.mark_all_stale()
            self._set_state(False)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
            kind, ident, ts = event["t"], str(event["id"]), float(event["ts"])
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed invalidation payload")
            return
        if kind == "c":
            self.memory.changed(public_id=ident)
            self.memory.evict(ident)
            self._spawn(self.redis.delete([ident]))
        elif kind == "p":
            self.memory.changed(owner_id=int(ident))
            evicted = self.memory.evict_owner(int(ident))
            self._spawn(self._evict_owner_everywhere(int(ident), evicted))
        elif kind == "j":
            if self.on_token_revoked is not None:
                self.on_token_revoked(event)
        else:
            self.memory.changed()
            for public_id in list(self.memory.entries):
                self.memory.evict(public_id)
            self._spawn(self.redis.flush_all())
        if self.on_event:
            self.on_event(max(0.0, time.time() - ts))

    async def _evict_owner_everywhere(self, owner_id: int, evicted: list[str]) -> None:
        await self.redis.delete(sorted(evicted))  # the ones we know of first, without waiting for the query
        ids = set(evicted)
        try:
            rows = await self.pool.fetch("SELECT public_id FROM credentials WHERE owner_id = $1", owner_id)
            ids.update(r[0] for r in rows)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            logger.warning("could not list credentials of principal %s; flushing Redis tier", owner_id)
            await self.redis.flush_all()
        await self.redis.delete(sorted(ids))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
