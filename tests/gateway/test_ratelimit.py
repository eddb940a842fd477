"""The rate limiter against a real Redis and Postgres: exact counts, leases, quotas, and life without Redis."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.core import store
from gateway.core.rate_policy import Policy, credential_limits
from gateway.core.route_config import Route, parse_upstream
from gateway.entry import CachedCredential
from gateway.ratelimit import RateLimiter
from gateway.ratelimit_state import Bucket, Decision, Limited
from gateway.redis_tier import quota_key, rate_key

# draft-ietf-httpapi-ratelimit-headers-11: a List of Strings with integer parameters.
POLICY_ITEM = r'"[a-z-]+";q=\d+;w=\d+'
STATE_ITEM = r'"[a-z-]+";r=\d+;t=\d+'
FIELDS = re.compile(
    rf"RateLimit-Policy: {POLICY_ITEM}(, {POLICY_ITEM})*\r\nRateLimit: {STATE_ITEM}(, {STATE_ITEM})*\r\n"
)


class Counted:
    """The decisions a limiter reported, by result."""

    def __init__(self) -> None:
        self.results: dict[str, int] = {}

    def __call__(self, route: str, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1


@pytest.fixture
async def client(clean_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.from_url(clean_redis_url)
    yield c
    await c.aclose()


def limiter_for(client: aioredis.Redis | None, pool: Any, mode: str = "local", processes: int = 1,
                counted: Counted | None = None) -> RateLimiter:
    return RateLimiter(client, pool, on_redis_down=mode, processes=processes, redis_timeout=0.5, store_timeout=1.5,
                       count=counted or Counted())


def entry(credential_id: int, rate: str | None = None, quota: str | None = None) -> CachedCredential:
    return CachedCredential(
        public_id="abcdefghijkl", credential_id=credential_id, kind="token", name="", owner_id=1, owner_name="svc",
        owner_disabled=False, revoked=False, expires_at=None, creator="admin", groups=frozenset(), current_fp="",
        previous_fp="", previous_until=0.0, fetched=0.0, stored_at=0.0, seq=0, limits=credential_limits(rate, quota),
    )


ROUTE = Route(prefix="/api", upstream=parse_upstream("http://127.0.0.1:9"), name="api")


async def decide(limiter: RateLimiter, buckets: tuple[Bucket, ...]) -> Decision:
    result = limiter.check("api", buckets)
    if isinstance(result, bytes | Limited):
        return result
    assert isinstance(result, Awaitable)
    return await result


async def run(limiter: RateLimiter, buckets: tuple[Bucket, ...], n: int) -> list[Decision]:
    return [await decide(limiter, buckets) for _ in range(n)]


def allowed(decisions: list[Decision]) -> int:
    return sum(1 for d in decisions if isinstance(d, bytes))


async def test_exactly_the_limit_then_429_with_retry_after(client: aioredis.Redis, pool: Any) -> None:
    counted = Counted()
    limiter = limiter_for(client, pool, counted=counted)
    buckets = limiter.for_credential(ROUTE, entry(1, "20/minute"), "10.0.0.1")
    assert buckets is not None
    decisions = await run(limiter, buckets, 30)
    assert [isinstance(d, bytes) for d in decisions] == [True] * 20 + [False] * 10
    assert all(FIELDS.fullmatch(d.decode()) for d in decisions if isinstance(d, bytes))
    first = decisions[0]
    assert isinstance(first, bytes) and b'"minute";q=20;w=60' in first and b'"minute";r=19;' in first
    refused = decisions[-1]
    assert isinstance(refused, Limited) and refused.error == "rate_limited" and refused.reset is None
    assert refused.retry_after == 3  # one unit every 60/20 s
    assert refused.policy == b'"minute";q=20;w=60' and re.fullmatch(rb'"minute";r=0;t=(59|60)', refused.state)
    assert counted.results == {"allowed": 20, "limited": 10}


async def test_concurrent_requests_of_two_processes_share_one_count(client: aioredis.Redis, pool: Any) -> None:
    first, second = limiter_for(client, pool), limiter_for(client, pool)
    credential = entry(2, "20/minute")
    a, b = first.for_credential(ROUTE, credential, "x"), second.for_credential(ROUTE, credential, "x")
    assert a is not None and b is not None
    decisions = await asyncio.gather(*(decide(first if i % 2 else second, a if i % 2 else b) for i in range(30)))
    assert allowed(list(decisions)) == 20


async def test_a_busy_credential_far_from_its_limit_leases_units(client: aioredis.Redis, pool: Any) -> None:
    limiter = limiter_for(client, pool)
    calls = 0
    script = limiter._gcra
    assert script is not None

    async def counting(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await script(**kwargs)

    limiter._gcra = counting  # type: ignore[assignment]
    buckets = limiter.for_credential(ROUTE, entry(3, "1000000/minute"), "x")
    assert buckets is not None
    decisions = await run(limiter, buckets, 5000)
    assert allowed(decisions) == 5000
    assert calls <= 6  # 1,000 units per lease
    last = decisions[-1]
    assert isinstance(last, bytes)
    remaining = re.search(rb'"minute";r=(\d+);', last)
    assert remaining is not None and 995_000 <= int(remaining.group(1)) < 1_000_000  # GCRA refills meanwhile


async def test_unused_lease_units_go_back(client: aioredis.Redis, pool: Any) -> None:
    limiter = limiter_for(client, pool)
    buckets = limiter.for_credential(ROUTE, entry(4, "100000/minute"), "x")  # 100 units per lease
    assert buckets is not None
    await run(limiter, buckets, 1)

    async def ahead_ms() -> float:
        seconds, micros = await client.time()
        raw = await client.get(rate_key("c:4", "minute"))
        return 0.0 if raw is None else (float(raw) - (seconds * 1e6 + micros)) / 1000

    assert 55 < await ahead_ms() <= 60  # 100 units of 0.6 ms are counted while the lease holds
    await limiter._give_back(math.inf)
    assert await ahead_ms() <= 0.6  # one unit used: the other 99 are back
    assert buckets[0].units == 0


async def test_route_and_credential_limits_the_smaller_wins(client: aioredis.Redis, pool: Any) -> None:
    limiter = limiter_for(client, pool)
    route = Route(prefix="/r", upstream=parse_upstream("http://127.0.0.1:9"), name="r",
                  rate_limit=Policy(5, "minute"))
    buckets = limiter.for_credential(route, entry(5, "10/minute"), "x")
    assert buckets is not None and [b.policy for b in buckets] == [Policy(5, "minute"), Policy(10, "minute")]
    decisions = await run(limiter, buckets, 12)
    assert allowed(decisions) == 5
    assert isinstance(decisions[0], bytes) and b'"route-minute";q=5;w=60, "minute";q=10;w=60' in decisions[0]
    loose = Route(prefix="/l", upstream=parse_upstream("http://127.0.0.1:9"), name="l",
                  rate_limit=Policy(10, "minute"))
    tight = limiter.for_credential(loose, entry(6, "5/minute"), "x")
    assert tight is not None and allowed(await run(limiter, tight, 12)) == 5


async def test_public_route_counts_each_address(client: aioredis.Redis, pool: Any) -> None:
    limiter = limiter_for(client, pool)
    route = Route(prefix="/p", upstream=parse_upstream("http://127.0.0.1:9"), auth_required=False, name="p",
                  rate_limit=Policy(3, "minute"), rate_limit_by="address")
    for address in ("10.0.0.1", "10.0.0.2"):
        buckets = limiter.for_address(route, address)
        assert buckets is not None and allowed(await run(limiter, buckets, 5)) == 3


async def _credential_with_usage(pool: Any, used_today: int) -> int:
    async with pool.acquire() as conn:
        owner = await conn.fetchval("INSERT INTO principals (name, kind) VALUES ('q', 'service') RETURNING id")
        cid = await conn.fetchval(
            "INSERT INTO credentials (public_id, kind, secret_hash, owner_id, created_by, quota) "
            "VALUES ('quotaquota12', 'token', '$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA', $1, 'test', '3/day') "
            "RETURNING id", owner)
        await store.write_usage(conn, {(cid, datetime.now(UTC).date()): used_today}, {})
    return int(cid)


async def test_quota_counts_on_from_postgres_after_a_redis_flush(client: aioredis.Redis, pool: Any) -> None:
    cid = await _credential_with_usage(pool, used_today=2)
    limiter = limiter_for(client, pool)
    buckets = limiter.for_credential(ROUTE, entry(cid, quota="3/day"), "x")
    assert buckets is not None
    decisions = await run(limiter, buckets, 2)
    assert isinstance(decisions[0], bytes) and b'"day";r=0;' in decisions[0]
    refused = decisions[1]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert isinstance(refused, Limited) and refused.error == "quota_exceeded"
    assert refused.reset == tomorrow.timestamp()
    assert abs(refused.retry_after - (tomorrow.timestamp() - time.time())) <= 2
    period_key = buckets[0].period_key
    assert await client.get(quota_key(cid, period_key)) == b"3"
    await client.flushdb()
    async with pool.acquire() as conn:  # what usage flushed for the request admitted above
        await store.write_usage(conn, {(cid, datetime.now(UTC).date()): 1}, {})
    fresh = limiter_for(client, pool)  # a restarted process: no lease, no memory of the refusal
    again = fresh.for_credential(ROUTE, entry(cid, quota="3/day"), "x")
    assert again is not None
    result = await decide(fresh, again)
    assert isinstance(result, Limited) and result.error == "quota_exceeded"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("mode", "expected_allowed"), [("local", 10), ("allow", 30), ("deny", 0)])
async def test_without_redis_on_redis_down_decides(pool: Any, mode: str, expected_allowed: int) -> None:
    unreachable = aioredis.from_url(f"redis://127.0.0.1:{_closed_port()}/0", socket_connect_timeout=0.2)
    counted = Counted()
    limiter = limiter_for(unreachable, pool, mode=mode, processes=2, counted=counted)
    shared: list[bool] = []
    limiter.shared = shared.append
    buckets = limiter.for_credential(ROUTE, entry(7, "20/minute"), "x")
    assert buckets is not None
    decisions = await run(limiter, buckets, 30)
    assert allowed(decisions) == expected_allowed  # "local": this process's half of 20
    assert counted.results == {"degraded": 30}
    assert shared == [False]
    refused = [d for d in decisions if isinstance(d, Limited)]
    assert all(d.error == "rate_limited" and d.retry_after >= 1 for d in refused)
    if mode == "allow":
        assert set(decisions) == {b""}
    await unreachable.aclose()


async def test_admitted_without_redis_is_charged_when_it_is_back(client: aioredis.Redis, pool: Any) -> None:
    limiter = limiter_for(client, pool, processes=1)
    buckets = limiter.for_credential(ROUTE, entry(8, "20/minute"), "x")
    assert buckets is not None
    limiter.down_until = time.monotonic() + 0.3  # as after a failed Redis call
    assert allowed(await run(limiter, buckets, 5)) == 5
    await asyncio.sleep(0.35)
    assert allowed(await run(limiter, buckets, 30)) == 15  # the 5 admitted locally were charged
    assert limiter.down_until == 0.0


async def test_heartbeat_counts_the_processes(client: aioredis.Redis, pool: Any) -> None:
    limiters = [limiter_for(client, pool) for _ in range(3)]
    for limiter in limiters:
        await limiter._heartbeat()
    await limiters[0]._heartbeat()
    assert limiters[0].processes == 3


async def test_credentials_refused_on_most_requests_are_counted(client: aioredis.Redis, pool: Any) -> None:
    seen: list[int] = []
    limiter = RateLimiter(client, pool, on_redis_down="local", processes=1, redis_timeout=0.5, store_timeout=1.5,
                          saturated=seen.append)
    noisy = limiter.for_credential(ROUTE, entry(9, "5/minute"), "x")
    calm = limiter.for_credential(ROUTE, entry(10, "100/minute"), "x")
    assert noisy is not None and calm is not None
    await run(limiter, noisy, 30)  # 25 of 30 refused
    await run(limiter, calm, 30)
    assert limiter.check_saturation() == 1 and seen == [1]
    assert limiter.check_saturation() == 0  # counted afresh each period


async def test_refused_credentials_are_reported_once_an_hour(client: aioredis.Redis, pool: Any) -> None:
    reports: list[list[int]] = []

    async def record(ids: list[int]) -> None:
        reports.append(ids)

    limiter = RateLimiter(client, pool, on_redis_down="local", processes=1, redis_timeout=0.5, store_timeout=1.5,
                          report_refused=record)
    buckets = limiter.for_credential(ROUTE, entry(11, "2/minute"), "x")
    assert buckets is not None
    await run(limiter, buckets, 5)
    await limiter._report_refused()
    await run(limiter, buckets, 5)
    await limiter._report_refused()  # the same hour: not again
    assert reports == [[11]]
