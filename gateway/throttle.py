"""Failure throttle: bounds argon2 runs per credential id and per client address, shared through Redis.

An attempt that will run argon2 first reserves a slot (INCR); a success gives it back. So even a burst
of concurrent wrong secrets runs argon2 at most `max_failures` times per window, across every process.
When Redis is down the same counting happens in process memory.
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis

from gateway.core.errors import REDIS_ERRORS
from gateway.core.settings import ThrottleSettings
from gateway.redis_tier import RedisTier, address_key, id_key


class _Window:
    __slots__ = ("count", "until")

    def __init__(self, until: float) -> None:
        self.count = 0
        self.until = until


class FailureThrottle:
    def __init__(self, settings: ThrottleSettings, redis_tier: RedisTier) -> None:
        self.max_id = settings.max_failures
        self.max_address = settings.per_address_max_failures
        self.window = settings.window_seconds
        self.window_ms = max(1, int(settings.window_seconds * 1000))
        self.redis = redis_tier
        self.local: dict[str, _Window] = {}

    # --- process-memory fallback (and the no-I/O check for unknown ids) ---

    def _local_incr(self, key: str, by: int = 1) -> tuple[int, float]:
        now = time.monotonic()
        window = self.local.get(key)
        if window is None or window.until <= now:
            if len(self.local) > 100_000:
                self.local = {k: w for k, w in self.local.items() if w.until > now}
            window = self.local[key] = _Window(now + self.window)
        window.count += by
        return window.count, window.until - now

    def blocked_address_locally(self, address: str) -> float | None:
        window = self.local.get(address_key(address))
        if window is not None and window.until > time.monotonic() and window.count >= self.max_address:
            return window.until - time.monotonic()
        return None

    def note_address_failure(self, address: str) -> None:
        """A failure that ran no argon2 (unknown id): counted per address, in memory only."""
        self._local_incr(address_key(address))

    # --- shared counting ---

    async def reserve(self, public_id: str, address: str) -> int | None:
        """Count an attempt before argon2 runs; returns Retry-After seconds when over a limit."""
        keys = (id_key(public_id), address_key(address))
        counts: list[tuple[int, float]] | None = None
        client = self.redis.client
        if client is not None and self.redis.up:
            counts = await self._redis_incr(client, keys, 1)
        if counts is None:
            counts = [self._local_incr(k) for k in keys]
        (id_count, id_ttl), (addr_count, addr_ttl) = counts
        local_addr = self.local.get(address_key(address))
        if local_addr is not None and local_addr.until > time.monotonic():
            addr_count += local_addr.count
        if id_count > self.max_id or addr_count > self.max_address:
            wait = max(id_ttl if id_count > self.max_id else 0.0, addr_ttl if addr_count > self.max_address else 0.0)
            return max(1, math.ceil(wait))
        return None

    async def refund(self, public_id: str, address: str) -> None:
        """The attempt succeeded: it is not a failure."""
        keys = (id_key(public_id), address_key(address))
        client = self.redis.client
        if client is not None and self.redis.up and await self._redis_incr(client, keys, -1) is not None:
            return
        for key in keys:
            self._local_incr(key, -1)

    async def _redis_incr(
        self, client: aioredis.Redis, keys: tuple[str, ...], by: int
    ) -> list[tuple[int, float]] | None:
        try:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    # SET NX PX starts the window once (works on Redis 6.2, unlike PEXPIRE NX)
                    pipe.set(key, 0, nx=True, px=self.window_ms)
                    pipe.incrby(key, by)
                    pipe.pttl(key)
                results = await pipe.execute()
        except REDIS_ERRORS:
            return None
        return [(int(results[i * 3 + 1]), max(0, int(results[i * 3 + 2])) / 1000) for i in range(len(keys))]
