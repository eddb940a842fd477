"""Rate limits and quotas, shared by every process of every replica through Redis, leased in slices.

Each limit a request is subject to is a `Bucket`: a credential's rate and quota, and a route's rate per
credential or per client address. The shared count lives in Redis (gateway.ratelimit_scripts: GCRA for
rates, a per-period counter for quotas). A process takes units in leases: one unit per Redis call while a
limit is below LEASE_DIVISOR x 2 units per window (exact), 1/LEASE_DIVISOR of it above, so a busy credential
far from its limit costs one Redis call per lease, not per request. Units a lease did not use go back after
LEASE_SECONDS. Worst case, a window can admit the units outstanding in leases on top of the limit: at most
lease size x processes (0 below 2,000 units per window; 0.1 % of the limit per process above).

When Redis cannot be reached, `ratelimit.on_redis_down` decides: "local" (each process enforces its share,
1/n of the limit with n the processes seen in the last heartbeat), "allow" or "deny" (429). What a process
admits meanwhile is charged to the shared count when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis

from gateway.core import store
from gateway.core.errors import REDIS_ERRORS, STORE_ERRORS
from gateway.core.rate_policy import CredentialLimits, Policy, period
from gateway.core.route_config import Route
from gateway.core.tasks import background
from gateway.entry import CachedCredential
from gateway.ratelimit_scripts import GCRA, QUOTA
from gateway.ratelimit_state import Bucket, Decision, Limited, field_values, fields
from gateway.redis_tier import RATE_MEMBERS_KEY, quota_key

logger = logging.getLogger(__name__)

LEASE_SECONDS = 1.0
RETRY_REDIS_SECONDS = 1.0  # after a failed Redis call, decide locally this long before trying again
IDLE_SECONDS = 60.0  # a bucket unused this long is forgotten (its shared state stays in Redis)
MAX_BUCKETS = 100_000  # per process: bounds memory when a route counts per client address
HEARTBEAT_SECONDS = 5.0
SATURATION_SECONDS = 60.0  # how often credentials refused on most requests are counted (and logged)
SWEEP_SECONDS = 0.5


class RateLimiter:
    def __init__(
        self,
        client: aioredis.Redis | None,
        pool: store.Pool,
        *,
        on_redis_down: str,
        processes: int,
        redis_timeout: float,
        store_timeout: float,
        count: Callable[[str, str], None] = lambda _route, _result: None,
        shared: Callable[[bool], None] = lambda _up: None,
        saturated: Callable[[int], None] = lambda _n: None,
        report_refused: Callable[[list[int]], Awaitable[None]] | None = None,
    ) -> None:
        self.client = client
        self.pool = pool
        self.mode = on_redis_down
        self.processes = max(1, processes)  # until the first heartbeat says how many count
        self.redis_timeout = redis_timeout
        self.store_timeout = store_timeout
        self.count = count  # (route, result) for credgate_ratelimit_decisions_total
        self.shared = shared
        self.saturated = saturated  # credentials refused on most of their requests in the last check
        # credential.rate_limited lifecycle events: the ids refused since the last report, at most once an hour each
        self.report_refused = report_refused
        self.refused_ids: set[int] = set()
        self._reported: dict[int, int] = {}  # credential id -> the hour it was last reported in
        self.member = uuid.uuid4().hex
        self.buckets: dict[tuple[str, Policy], Bucket] = {}
        self.sets: dict[tuple[str, int, str], tuple[CredentialLimits | None, tuple[Bucket, ...]]] = {}
        self.down_until = 0.0 if client is not None else math.inf
        self._gcra = client.register_script(GCRA) if client is not None else None
        self._quota = client.register_script(QUOTA) if client is not None else None
        if client is None:
            logger.warning("rate limits: no Redis configured; each process enforces them alone (%s)", self.mode)

    # --- which limits apply ---------------------------------------------------------------------------

    def for_credential(self, route: Route, entry: CachedCredential, address: str) -> tuple[Bucket, ...] | None:
        limits, route_rate = entry.limits, route.rate_limit
        if limits is None and route_rate is None:
            return None
        by_address = route.rate_limit_by == "address"
        # keyed by plain values (cheap to hash); the policies are checked by identity: limits are shared
        # instances (rate_policy.credential_limits), so a changed credential gets its new buckets at once
        key = (route.name, entry.credential_id, address if by_address else "")
        found = self.sets.get(key)
        if found is not None and found[0] is limits:
            return found[1]
        wanted: list[Bucket] = []
        cid = entry.credential_id
        if route_rate is not None:
            who = f"a:{address}" if by_address else f"c:{cid}"
            wanted.append(self._bucket(f"route-{route_rate.unit}", route_rate, f"r:{route.name}:{who}",
                                       0 if by_address else cid))
        if limits is not None and limits.rate is not None:
            wanted.append(self._bucket(limits.rate.unit, limits.rate, f"c:{cid}", cid))
        if limits is not None and limits.quota is not None:  # last: a refused rate spends no quota
            wanted.append(self._bucket(limits.quota.unit, limits.quota, f"q:{cid}", cid))
        buckets = tuple(wanted)
        self.sets[key] = (limits, buckets)
        return buckets

    def for_address(self, route: Route, address: str) -> tuple[Bucket, ...] | None:
        rate = route.rate_limit
        if rate is None:
            return None
        key = (route.name, 0, address)
        found = self.sets.get(key)
        if found is None:
            found = self.sets[key] = (None, (self._bucket(f"route-{rate.unit}", rate, f"r:{route.name}:a:{address}"),))
        return found[1]

    def _bucket(self, name: str, policy: Policy, subject: str, credential_id: int = 0) -> Bucket:
        found = self.buckets.get((subject, policy))
        if found is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self._forget(time.monotonic(), idle=0.0)
            found = self.buckets[(subject, policy)] = Bucket(name, policy, subject, credential_id)
        return found

    # --- the decision ----------------------------------------------------------------------------------

    def check(self, route: str, buckets: tuple[Bucket, ...]) -> Decision | Awaitable[Decision]:
        """Take one unit from every bucket, or refuse. Without a Redis call while every lease has units."""
        now = time.monotonic()
        for b in buckets:
            if b.units <= 0 or now >= b.lease_until:
                if now < self.down_until:
                    return self._decide_locally(route, buckets, now)
                return self._check_shared(route, buckets)
        for b in buckets:
            b.units -= 1
            b.last_used = now
            b.admitted += 1
        self.count(route, "allowed")
        return fields(buckets, now)

    async def _check_shared(self, route: str, buckets: tuple[Bucket, ...]) -> Decision:
        for b in buckets:
            while True:
                now = time.monotonic()
                if b.units > 0 and now < b.lease_until:
                    break
                if b.denied_until > now:
                    return self._refuse(route, buckets, b, now, "limited")
                if now < self.down_until:
                    return self._decide_locally(route, buckets, now)
                if b.busy is not None:  # another request of this process is already asking Redis
                    await asyncio.shield(b.busy)
                    continue
                b.busy = asyncio.get_running_loop().create_future()
                try:
                    await self._refill(b, want=b.lease)
                finally:
                    b.busy.set_result(None)
                    b.busy = None
        now = time.monotonic()
        for b in buckets:
            b.units -= 1  # may go below 0 when requests raced for the last unit: charged at the next refill
            b.last_used = now
            b.admitted += 1
        self.count(route, "allowed")
        return fields(buckets, now)

    def _refuse(self, route: str, buckets: tuple[Bucket, ...], b: Bucket, now: float, result: str) -> Limited:
        """429 for the bucket `b` that has no unit; `result` labels the decision ("limited" or "degraded")."""
        quota = b.policy.kind == "quota"
        self.count(route, "quota_exceeded" if quota and result == "limited" else result)
        b.refused += 1
        if b.credential_id:
            self.refused_ids.add(b.credential_id)
        retry = max(1, math.ceil(b.denied_until - now))
        if quota:
            return Limited("quota_exceeded", f"the credential's quota of {b.policy} is used up",
                           max(1, math.ceil(b.reset_at - now)), b.period_end or None, *field_values(buckets, now, b))
        return Limited("rate_limited", f"rate limit of {b.policy} exceeded; retry later", retry, None,
                       *field_values(buckets, now, b))

    # --- Redis --------------------------------------------------------------------------------------------

    async def _refill(self, b: Bucket, want: int) -> None:
        """Ask Redis for `want` units, giving back what the last lease left (or charging what it overdrew)."""
        assert self._gcra is not None and self._quota is not None
        now, wall = time.monotonic(), time.time()
        if b.units > 0 and now < b.lease_until:
            back, keep = -b.debt, b.units  # the lease still holds: keep it, settle only the debt
        else:
            back, keep = b.units - b.debt, 0  # unused units go back; overdrawn ones (b.units < 0) are charged
        if b.policy.kind == "quota":
            current = period(b.policy.unit, wall)
            if current.key != b.period_key:  # a new day or month: what the old period owed stays there
                b.period_key, b.key, back, keep = current.key, quota_key(b.credential_id, current.key), 0, 0
                b.local_used = 0
            b.period_end = current.end.timestamp()
            b.reset_at = now + (b.period_end - wall)
            b.set_policy_item(b.name + f";q={b.policy.count};w={current.seconds}".encode())
        try:
            async with asyncio.timeout(self.redis_timeout):
                if b.policy.kind == "quota":
                    ttl = math.ceil(b.reset_at - now) + 86400
                    args: list[str | int | float] = [b.policy.count, want, back, ttl, ""]
                    answer = await self._quota(keys=[b.key], args=args)
                    if answer[0] == -1:  # Redis lost the count (flushed or failed over): Postgres has it
                        args[4] = await self._used_in_period(b)
                        answer = await self._quota(keys=[b.key], args=args)
                    granted, remaining = int(answer[0]), int(answer[1])
                    retry = b.reset_at - now
                else:
                    window_us = b.policy.window * 1_000_000
                    args = [window_us / b.policy.count, window_us, want, back]
                    granted, remaining, whole_us, retry_us = (int(v) for v in await self._gcra(keys=[b.key], args=args))
                    b.reset_at = now + whole_us / 1e6
                    retry = retry_us / 1e6
        except (*REDIS_ERRORS, *STORE_ERRORS) as exc:
            self._lost(exc)
            return
        if self.down_until:
            self._regained()
        b.units, b.debt, b.remaining = keep + granted, 0, remaining
        b.lease_until = now + LEASE_SECONDS if b.policy.kind == "rate" else min(now + LEASE_SECONDS, b.reset_at)
        # a spent quota is asked again within a minute: leases other processes give back, or a raised quota
        b.denied_until = now + min(retry, 60.0 if b.policy.kind == "quota" else retry) if granted < want else 0.0
        b.lease = b.base_lease if remaining >= 10 * b.base_lease else 1  # near the limit, one unit at a time
        b.local_tat, b.local_used = 0.0, 0

    async def _used_in_period(self, b: Bucket) -> int:
        """The requests usage recorded in Postgres in the bucket's period (forwarded ones; flushed every few
        seconds, so a Redis flush forgets at most what the last flush interval admitted)."""
        current = period(b.policy.unit, time.time())
        async with asyncio.timeout(self.store_timeout), self.pool.acquire() as conn:
            used = await conn.fetchval(store.QUOTA_USED, b.credential_id, current.start.date(), current.end.date())
        return int(used or 0)

    def _lost(self, exc: BaseException) -> None:
        if self.down_until == 0.0:
            logger.warning("rate limits: shared counting unavailable (%s); on_redis_down = %r until it is back",
                           exc.__class__.__name__, self.mode)
            self.shared(False)
        self.down_until = time.monotonic() + RETRY_REDIS_SECONDS

    def _regained(self) -> None:
        logger.info("rate limits: counting in Redis again")
        self.down_until = 0.0
        self.shared(True)

    # --- without Redis --------------------------------------------------------------------------------------

    def _decide_locally(self, route: str, buckets: tuple[Bucket, ...], now: float) -> Decision:
        if self.mode == "allow":
            self.count(route, "degraded")
            return b""
        if self.mode == "deny":
            self.count(route, "degraded")
            return Limited("rate_limited", "rate limits cannot be checked right now; retry shortly", 1, None,
                           *field_values(buckets, now))
        for b in buckets:
            if b.units > 0 and now < b.lease_until:
                continue  # a lease Redis granted before it went away still holds
            if not self._local_unit(b, now):
                return self._refuse(route, buckets, b, now, "degraded")
        for b in buckets:
            if b.units > 0 and now < b.lease_until:
                b.units -= 1
            else:
                self._spend_local(b, now)
            b.last_used = now
        self.count(route, "degraded")
        return fields(buckets, now)

    def _local_unit(self, b: Bucket, now: float) -> bool:
        """Whether this process's share of the limit has a unit left (sets denied_until when not)."""
        share = max(1, b.policy.count // self.processes)
        if b.policy.kind == "quota":
            allowance = max(1, b.remaining // self.processes)  # of what was left when Redis was last heard
            if b.local_used < allowance:
                return True
            b.denied_until = b.reset_at
            return False
        interval = b.policy.window / share
        tat = max(b.local_tat, now)
        if tat + interval - now <= b.policy.window:
            return True
        b.denied_until = tat + interval - b.policy.window
        return False

    def _spend_local(self, b: Bucket, now: float) -> None:
        b.debt += 1
        if b.policy.kind == "quota":
            b.local_used += 1
        else:
            share = max(1, b.policy.count // self.processes)
            b.local_tat = max(b.local_tat, now) + b.policy.window / share
            b.reset_at = b.local_tat

    # --- housekeeping ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RateLimiter]:
        """Give back expired leases and send heartbeats while the block runs; give back every lease at its end."""
        try:
            async with background(self._housekeeping(), "rate-limit housekeeping"):
                yield self
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.redis_timeout * 2):
                    await self._give_back(math.inf)

    def check_saturation(self) -> int:
        """Count (and log) the credentials refused on most of their requests since the last check."""
        refused: dict[int, int] = {}
        admitted: dict[int, int] = {}
        for b in self.buckets.values():
            if b.credential_id:  # not a route's count per client address
                who = b.credential_id
                refused[who] = refused.get(who, 0) + b.refused
                admitted[who] = admitted.get(who, 0) + b.admitted
            b.refused = b.admitted = 0
        saturated = sorted(who for who, n in refused.items() if n >= 10 and n > admitted[who])
        for who in saturated:
            logger.info("rate limits: credential #%s was refused on %d of %d requests in the last %.0f s",
                        who, refused[who], refused[who] + admitted[who], SATURATION_SECONDS)
        self.saturated(len(saturated))
        return len(saturated)

    async def _report_refused(self) -> None:
        """Hand the credentials refused since the last report (each at most once an hour) to `report_refused`."""
        hour = int(time.time() // 3600)
        ids = sorted(cid for cid in self.refused_ids if self._reported.get(cid) != hour)
        self.refused_ids.clear()
        if not ids or self.report_refused is None:
            return
        try:
            await self.report_refused(ids)
        except (*STORE_ERRORS, TimeoutError) as exc:  # the store may be away: try again at the next report
            logger.warning("rate limits: could not record rate_limited events (%s)", exc.__class__.__name__)
            self.refused_ids.update(ids)
            return
        self._reported = {cid: h for cid, h in self._reported.items() if h == hour}
        self._reported.update((cid, hour) for cid in ids)

    async def _housekeeping(self) -> None:
        next_beat = 0.0
        next_saturation = time.monotonic() + SATURATION_SECONDS
        while True:
            now = time.monotonic()
            if now >= next_saturation:
                self.check_saturation()
                await self._report_refused()
                next_saturation = now + SATURATION_SECONDS
            if now >= self.down_until:
                if now >= next_beat:
                    await self._heartbeat()
                    next_beat = now + HEARTBEAT_SECONDS
                await self._give_back(now)
            self._forget(now, IDLE_SECONDS)
            await asyncio.sleep(SWEEP_SECONDS)

    async def _give_back(self, now: float) -> None:
        for b in list(self.buckets.values()):
            if (b.units or b.debt) and (now >= b.lease_until or now == math.inf) and b.busy is None:
                b.lease_until = 0.0
                await self._refill(b, want=0)
                if time.monotonic() < self.down_until:
                    return

    async def _heartbeat(self) -> None:
        """Count the processes that enforce limits (each enforces 1/n of a limit while Redis is away)."""
        if self.client is None:
            return
        try:
            async with asyncio.timeout(self.redis_timeout):
                seconds, micros = await self.client.time()
                now_ms = seconds * 1000 + micros // 1000
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.zadd(RATE_MEMBERS_KEY, {self.member: now_ms})
                    pipe.zremrangebyscore(RATE_MEMBERS_KEY, "-inf", now_ms - 3 * HEARTBEAT_SECONDS * 1000)
                    pipe.zcard(RATE_MEMBERS_KEY)
                    pipe.pexpire(RATE_MEMBERS_KEY, int(6 * HEARTBEAT_SECONDS * 1000))
                    answers = await pipe.execute()
            self.processes = max(1, int(answers[2]))
        except REDIS_ERRORS as exc:
            self._lost(exc)

    def _forget(self, now: float, idle: float) -> None:
        stale = [k for k, b in self.buckets.items()
                 if b.units == 0 and b.debt == 0 and b.busy is None and now - b.last_used >= idle
                 and now >= b.denied_until]
        if stale:
            for k in stale:
                del self.buckets[k]
            self.sets.clear()  # rebuilt on demand from the buckets that remain
