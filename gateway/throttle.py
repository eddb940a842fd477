"""Failure throttle: bounds argon2 runs per (credential id, client address), per address and per id, through Redis.

An attempt that will run argon2 first reserves a slot in three counters, and a success gives it back:
  (id, address)  `max_failures`: past it that address gets 429 for that id, and no other address does;
  address        `per_address_max_failures`, over every id;
  id             `per_id_max_failures`, over every address: the bound on a distributed attack on one id.
An attempt refused by any counter reserves in none, so one address's refused attempts never count against the
id for the others. In Redis the check and the increments are one Lua script (one round trip, atomic), so even
a burst of concurrent wrong secrets runs argon2 at most the limits per window across every worker and replica.
Each process also keeps its own reservations in memory and checks them first: a process never passes a limit
on its own, whether Redis answers, misses a call (a full connection pool) or is down.
"""

from __future__ import annotations

import math
import time

from redis.commands.core import AsyncScript

from gateway.core.errors import REDIS_ERRORS
from gateway.core.settings import ThrottleSettings
from gateway.redis_tier import RedisTier, address_key, id_key, pair_key

# KEYS: the counters; ARGV: the window in ms, then each counter's limit. SET NX PX starts a counter's window
# (a counter left without one, as a non-atomic INCR could once leave it, gets one). Reserves in every counter
# only when none is at its limit; returns 0 then, else the ms until the last blocking window ends (>= 1).
_RESERVE = """
local wait = 0
for i, key in ipairs(KEYS) do
    redis.call('SET', key, 0, 'NX', 'PX', ARGV[1])
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then
        redis.call('PEXPIRE', key, ARGV[1])
        ttl = tonumber(ARGV[1])
    end
    if tonumber(redis.call('GET', key)) >= tonumber(ARGV[i + 1]) then
        wait = math.max(wait, ttl, 1)
    end
end
if wait == 0 then
    for _, key in ipairs(KEYS) do
        redis.call('INCR', key)
    end
end
return wait
"""

# Gives a reservation back, never below zero: a window that ended took its reservations with it. (A success
# whose argon2 run straddles the start of a new window still gives its slot to that window: one extra run at
# most, per verification of a correct secret that ends just then.)
_REFUND = """
for _, key in ipairs(KEYS) do
    if tonumber(redis.call('GET', key) or 0) > 0 then
        redis.call('DECR', key)
    end
end
return 0
"""

# Unknown-id failures per address: counted in memory only (no argon2 ran, nothing to share).
_UNKNOWN_PREFIX = "unknown:"
# Windows kept in memory. Past it the ended ones are dropped, and if most are still running (an attack from very
# many addresses) all are: Redis keeps the shared counts, and the pruning stays cheap.
_MAX_WINDOWS = 100_000


class _Window:
    __slots__ = ("count", "until")

    def __init__(self, until: float) -> None:
        self.count = 0
        self.until = until


class FailureThrottle:
    def __init__(self, settings: ThrottleSettings, redis_tier: RedisTier) -> None:
        self.max_pair = settings.max_failures
        self.max_address = settings.per_address_max_failures
        self.max_id = settings.per_id_max_failures
        self.window = settings.window_seconds
        self.window_ms = max(1, int(settings.window_seconds * 1000))
        self.redis = redis_tier
        self.local: dict[str, _Window] = {}
        client = redis_tier.client
        self._reserve_script = client.register_script(_RESERVE) if client is not None else None
        self._refund_script = client.register_script(_REFUND) if client is not None else None

    # --- this process's own counts ---

    def _local_window(self, key: str, now: float) -> _Window:
        window = self.local.get(key)
        if window is None or window.until <= now:
            if len(self.local) >= _MAX_WINDOWS:
                self.local = {k: w for k, w in self.local.items() if w.until > now}
                if len(self.local) >= _MAX_WINDOWS // 2:
                    self.local = {}
            window = self.local[key] = _Window(now + self.window)
        return window

    def _local_count(self, key: str) -> int:
        window = self.local.get(key)
        return window.count if window is not None and window.until > time.monotonic() else 0

    def _local_reserve(self, keys: tuple[str, ...]) -> float | None:
        """As the Lua script, in this process: seconds to wait, or None when reserved in every counter."""
        now = time.monotonic()
        windows = [self._local_window(key, now) for key in keys]
        limits = (self.max_pair, self.max_address, self.max_id)
        blocking = [w.until - now for w, limit in zip(windows, limits, strict=True) if w.count >= limit]
        if blocking:
            return max(blocking)
        for window in windows:
            window.count += 1
        return None

    def _local_refund(self, keys: tuple[str, ...]) -> None:
        now = time.monotonic()
        for key in keys:
            window = self.local.get(key)
            if window is not None and window.until > now and window.count > 0:
                window.count -= 1

    def _local_wait(self, key: str, limit: int, now: float) -> float:
        """Seconds until this process's own count for `key` is under `limit` again (0: it is now)."""
        window = self.local.get(key)
        return window.until - now if window is not None and window.until > now and window.count >= limit else 0.0

    def blocked_locally(self, public_id: str, address: str) -> float | None:
        """Seconds until this process's own counts let `address` try `public_id` again; None when they do.
        A lower bound of everyone's counts: refusing here needs no Redis and no store read."""
        now = time.monotonic()
        wait = max(self._local_wait(pair_key(public_id, address), self.max_pair, now),
                   self._local_wait(address_key(address), self.max_address, now),
                   self._local_wait(id_key(public_id), self.max_id, now))
        return wait or None

    def blocked_address_locally(self, address: str) -> float | None:
        return self._local_wait(address_key(address), self.max_address, time.monotonic()) or None

    def note_address_failure(self, address: str) -> None:
        """A failure that ran no argon2 (unknown id): counted per address, in memory only."""
        now = time.monotonic()
        self._local_window(address_key(address), now).count += 1
        self._local_window(_UNKNOWN_PREFIX + address, now).count += 1

    # --- shared counting ---

    async def reserve(self, public_id: str, address: str) -> int | None:
        """Count an attempt before argon2 runs; returns Retry-After seconds when over a limit."""
        keys = (pair_key(public_id, address), address_key(address), id_key(public_id))
        wait = self._local_reserve(keys)  # this process's own count, a lower bound of everyone's
        if wait is None and self._reserve_script is not None and self.redis.up:
            # this process's unknown-id failures from the address count against its limit too
            limits = (self.max_pair, self.max_address - self._local_count(_UNKNOWN_PREFIX + address), self.max_id)
            waited_ms = await self._run(self._reserve_script, keys, (self.window_ms, *limits))
            if waited_ms:  # refused by everyone's count: reserved nowhere
                self._local_refund(keys)
                wait = waited_ms / 1000
            # (no answer from Redis: the reservation in memory stands alone)
        return None if wait is None else max(1, math.ceil(wait))

    async def refund(self, public_id: str, address: str) -> None:
        """The attempt succeeded: it is not a failure."""
        keys = (pair_key(public_id, address), address_key(address), id_key(public_id))
        self._local_refund(keys)
        if self._refund_script is not None and self.redis.up:
            await self._run(self._refund_script, keys, ())

    @staticmethod
    async def _run(script: AsyncScript, keys: tuple[str, ...], args: tuple[int, ...]) -> int | None:
        """The script's answer, None when Redis did not give one."""
        try:
            return int(await script(keys=keys, args=args))
        except REDIS_ERRORS:
            return None
