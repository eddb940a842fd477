"""The shared cache tier in Redis: its keys (one home) and a client that degrades to "no answer" when Redis is away.

Neither the keys nor the values ever hold a secret: a credential's hash holds its record (field "r") and the
keyed digests of secrets verified against it (fields "d:<digest hex>").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from gateway.core.errors import REDIS_ERRORS
from gateway.core.redis_client import redis_client
from gateway.entry import CachedCredential

logger = logging.getLogger(__name__)

# Redis keys: one home. A hash per credential: field "r" is the record, "d:<digest hex>" a verified digest.
REDIS_PREFIX = "credgate:"


def credential_key(public_id: str) -> str:
    return f"{REDIS_PREFIX}cred:{public_id}"


def negative_key(public_id: str) -> str:
    return f"{REDIS_PREFIX}unknown:{public_id}"


def id_key(public_id: str) -> str:
    """The failure throttle's counter for one credential id."""
    return f"{REDIS_PREFIX}fail:id:{public_id}"


def address_key(address: str) -> str:
    """The failure throttle's counter for one client address."""
    return f"{REDIS_PREFIX}fail:ip:{address}"


def pair_key(public_id: str, address: str) -> str:
    """The failure throttle's counter for one credential id from one client address."""
    return f"{REDIS_PREFIX}fail:pair:{public_id}:{address}"


def verifying_key(public_id: str, digest: bytes) -> str:
    return f"{REDIS_PREFIX}verifying:{public_id}:{digest.hex()[:32]}"


def rate_key(subject: str, unit: str) -> str:
    """A GCRA state (theoretical arrival time) for a subject such as "c:<credential id>" and a window unit."""
    return f"{REDIS_PREFIX}rate:{subject}:{unit}"


def quota_key(credential_id: int, period: str) -> str:
    """The requests granted to a credential in one quota period (e.g. "m202612")."""
    return f"{REDIS_PREFIX}quota:{credential_id}:{period}"


# Every process counting rate limits, scored by its last heartbeat: "local" mode enforces 1/n of a limit.
RATE_MEMBERS_KEY = f"{REDIS_PREFIX}rate:members"



# Redis connections per process; far more than one process keeps busy (each call takes well under 1 ms).
_MAX_CONNECTIONS = 64


class RedisTier:
    """The shared tier. Every call degrades to 'no answer' when Redis is unreachable; `up` tells which."""

    def __init__(
        self,
        url: str,
        ttl: float,
        negative_ttl: float,
        on_state: Callable[[bool], None] = lambda _up: None,
        timeout: float = 0.5,
    ) -> None:
        self.client: aioredis.Redis | None = None
        if url:
            # A burst of requests waits (up to the deadline) for one of a bounded set of connections: an
            # unbounded pool would open a connection per concurrent request, a non-blocking one fails them.
            # A redis+sentinel:// URL gives a client that follows the master the Sentinels name.
            self.client = redis_client(url, max_connections=_MAX_CONNECTIONS, timeout=timeout)
        self.ttl_ms = int(ttl * 1000)
        self.negative_ms = max(1, int(negative_ttl * 1000))
        self.up = self.client is not None
        self._retry_at = 0.0
        self.on_state = on_state  # called with False when Redis is lost, True when it is back

    def _available(self) -> bool:
        if self.client is None:
            return False
        return self.up or time.monotonic() >= self._retry_at

    def _failed(self, exc: BaseException) -> None:
        if self.up:
            logger.warning("redis unavailable (%s); continuing with memory and the store", exc.__class__.__name__)
        self.up = False
        self._retry_at = time.monotonic() + 1.0  # probe again at most once a second
        self.on_state(False)

    def _ok(self) -> None:
        if not self.up:
            logger.info("redis is back")
            self.up = True
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
        except REDIS_ERRORS as exc:
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
        except REDIS_ERRORS as exc:
            self._failed(exc)
            return
        self._ok()

    async def put_negative(self, public_id: str) -> None:
        if not self._available():
            return
        assert self.client is not None
        try:
            await self.client.set(negative_key(public_id), b"1", px=self.negative_ms)
        except REDIS_ERRORS as exc:
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
        except REDIS_ERRORS as exc:
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
        except REDIS_ERRORS as exc:
            self._failed(exc)

    async def claim_verification(self, public_id: str, digest: bytes, ms: int) -> bool:
        """True when this process should run argon2 for this secret; False when another already is."""
        if not self._available():
            return True
        assert self.client is not None
        try:
            claimed = await self.client.set(verifying_key(public_id, digest), b"1", nx=True, px=ms)
        except REDIS_ERRORS as exc:
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
